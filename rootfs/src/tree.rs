//! The image tree: every path that goes into the initramfs and what it is.
//!
//! Paths are kept in component order (see [`ImagePath`]'s `Ord`), so iterating a [`Tree`]
//! is a depth-first walk where every directory comes right before its contents. Parent
//! directories are created on insert, so the tree never holds a path whose parent is missing.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// Permission bits a node may carry (setuid, setgid, sticky, rwx for all).
pub const PERMISSION_BITS: u32 = 0o7777;
/// Mode of directories created implicitly as parents.
pub const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Longest path the kernel accepts (`PATH_MAX` minus the NUL).
const MAX_PATH_LEN: usize = 4095;
/// Longest file name tmpfs accepts (`NAME_MAX`).
const MAX_NAME_LEN: usize = 255;
/// The newc end-of-archive marker; a file of that name would end the archive early.
const CPIO_TRAILER: &str = "TRAILER!!!";
/// The kernel's `dev_t` splits into a 12-bit major and a 20-bit minor.
const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;

/// A validated path inside the image, relative to its root: `nix/store/…-glibc/lib/libc.so.6`,
/// `init`, `etc/passwd`.
///
/// Rejected: empty paths, a leading `/` (absolute), empty components (`a//b`, trailing `/`),
/// `.` and `..` components, NUL bytes, paths over 4095 bytes, names over 255 bytes, and a
/// first component `TRAILER!!!` (the newc end marker; even as the implicit parent of
/// `TRAILER!!!/x` it would end the archive early). Paths are UTF-8 strings: a host file
/// whose name is not UTF-8 is an error when it is added, never silently renamed.
///
/// Ordering compares component by component, so `a` < `a/b` < `a/z` < `a-b`: a directory's
/// whole subtree sorts right after it, before any sibling.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImagePath(String);

impl ImagePath {
    /// Validates `path` as an image path.
    pub fn new(path: impl Into<String>) -> Result<ImagePath> {
        let path = path.into();
        match invalid_reason(&path) {
            Some(reason) => Err(Error::InvalidPath { path, reason }),
            None => Ok(ImagePath(path)),
        }
    }

    /// The path as written in the archive, without a leading `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as seen on the booted system, with a leading `/`.
    pub fn to_absolute(&self) -> String {
        format!("/{}", self.0)
    }

    /// The path's components (never empty, never `.` or `..`).
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The containing directory, or `None` for a path at the image root.
    pub fn parent(&self) -> Option<ImagePath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| ImagePath(parent.to_owned()))
    }

    /// Appends one or more components (validated as a whole).
    pub fn join(&self, rest: &str) -> Result<ImagePath> {
        ImagePath::new(format!("{}/{rest}", self.0))
    }

    /// True if `self` is `other` or inside it.
    pub fn starts_with(&self, other: &ImagePath) -> bool {
        match self.0.strip_prefix(&other.0) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// Strict ancestors, outermost first: `a`, `a/b` for `a/b/c`.
    fn ancestors(&self) -> impl Iterator<Item = ImagePath> + '_ {
        self.0
            .match_indices('/')
            .map(|(i, _)| ImagePath(self.0[..i].to_owned()))
    }
}

/// The node for a host file, directory or symlink (`meta` from `symlink_metadata`), with the
/// host's permission bits.
fn host_node(host: &Path, meta: &fs::Metadata) -> Result<Node> {
    let mode = meta.permissions().mode() & PERMISSION_BITS;
    let file_type = meta.file_type();
    if file_type.is_dir() {
        Ok(Node::dir(mode))
    } else if file_type.is_file() {
        Ok(Node::file(Source::Host(host.to_owned()), mode))
    } else if file_type.is_symlink() {
        let target = fs::read_link(host).map_err(|e| Error::io("reading symlink", host, e))?;
        let target = target
            .into_os_string()
            .into_string()
            .map_err(|_| Error::NonUtf8 {
                path: host.to_owned(),
                what: "symlink target",
            })?;
        Ok(Node::symlink(target))
    } else {
        Err(Error::UnsupportedFileType {
            path: host.to_owned(),
            kind: special_kind(&file_type),
        })
    }
}

fn invalid_reason(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("empty path");
    }
    if path.starts_with('/') {
        return Some("absolute path, image paths are relative to the image root");
    }
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    if path.len() > MAX_PATH_LEN {
        return Some("longer than 4095 bytes");
    }
    if path.split('/').next() == Some(CPIO_TRAILER) {
        return Some("reserved as the cpio end-of-archive marker");
    }
    for component in path.split('/') {
        match component {
            "" => return Some("empty component (duplicate or trailing slash)"),
            "." => return Some("contains a `.` component"),
            ".." => return Some("contains a `..` component"),
            name if name.len() > MAX_NAME_LEN => return Some("a component is over 255 bytes"),
            _ => {}
        }
    }
    None
}

impl Ord for ImagePath {
    /// The same order as comparing the components one by one, computed on the bytes: `/`
    /// ranks below every other byte (no component holds a NUL or a `/`), so a path sorts
    /// before its own subtree's siblings exactly as a component-wise comparison would.
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        let rank = |c: u8| if c == b'/' { 0 } else { c };
        match a.iter().zip(b).position(|(x, y)| x != y) {
            Some(i) => rank(a[i]).cmp(&rank(b[i])),
            None => a.len().cmp(&b.len()),
        }
    }
}

impl PartialOrd for ImagePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for ImagePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ImagePath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ImagePath::new(s)
    }
}

impl TryFrom<&str> for ImagePath {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        ImagePath::new(s)
    }
}

impl TryFrom<String> for ImagePath {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        ImagePath::new(s)
    }
}

/// Where a file's contents come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A host file, opened and streamed at pack time (never held in memory as a whole).
    Host(PathBuf),
    /// Contents generated in memory (init scripts, /etc files).
    Bytes(Vec<u8>),
}

impl Source {
    /// The whole contents: read from the host file, or borrowed.
    pub fn read(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Source::Bytes(bytes) => Ok(bytes.into()),
            Source::Host(host) => fs::read(host)
                .map(Into::into)
                .map_err(|e| Error::io("reading", host, e)),
        }
    }
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File {
        source: Source,
    },
    Dir,
    /// The target text, stored verbatim (relative or absolute).
    Symlink {
        target: String,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
}

/// One entry of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits only (masked by [`PERMISSION_BITS`]); the type bits come from `kind`.
    pub mode: u32,
    /// The store path this node comes from (`/nix/store/…-glibc`), for the manifest.
    pub owner: Option<String>,
}

impl Node {
    /// A regular file.
    pub fn file(source: Source, mode: u32) -> Node {
        Node::new(NodeKind::File { source }, mode)
    }

    /// A directory.
    pub fn dir(mode: u32) -> Node {
        Node::new(NodeKind::Dir, mode)
    }

    /// A symlink with mode 0777, the only mode Linux gives symlinks.
    pub fn symlink(target: impl Into<String>) -> Node {
        Node::new(
            NodeKind::Symlink {
                target: target.into(),
            },
            0o777,
        )
    }

    /// A character device node.
    pub fn char_dev(major: u32, minor: u32, mode: u32) -> Node {
        Node::new(NodeKind::CharDev { major, minor }, mode)
    }

    /// A block device node.
    pub fn block_dev(major: u32, minor: u32, mode: u32) -> Node {
        Node::new(NodeKind::BlockDev { major, minor }, mode)
    }

    /// Records the owning store path.
    pub fn owned_by(mut self, owner: impl Into<String>) -> Node {
        self.owner = Some(owner.into());
        self
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir)
    }

    fn new(kind: NodeKind, mode: u32) -> Node {
        Node {
            kind,
            mode,
            owner: None,
        }
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            NodeKind::File { .. } => "file",
            NodeKind::Dir => "directory",
            NodeKind::Symlink { .. } => "symlink",
            NodeKind::CharDev { .. } => "character device",
            NodeKind::BlockDev { .. } => "block device",
        }
    }

    /// A short description for conflict messages.
    fn describe(&self) -> String {
        let what = match &self.kind {
            NodeKind::File {
                source: Source::Host(host),
            } => format!("file {:04o} from {}", self.mode, host.display()),
            NodeKind::File {
                source: Source::Bytes(bytes),
            } => format!("file {:04o} of {} generated bytes", self.mode, bytes.len()),
            NodeKind::Dir => format!("directory {:04o}", self.mode),
            NodeKind::Symlink { target } => format!("symlink to {target}"),
            NodeKind::CharDev { major, minor } => {
                format!("character device {major}:{minor} {:04o}", self.mode)
            }
            NodeKind::BlockDev { major, minor } => {
                format!("block device {major}:{minor} {:04o}", self.mode)
            }
        };
        match &self.owner {
            Some(owner) => format!("{what} (owned by {owner})"),
            None => what,
        }
    }

    fn validate(&self, path: &ImagePath) -> Result<()> {
        let invalid = |reason: String| Error::InvalidNode {
            path: path.clone(),
            reason,
        };
        if self.mode & !PERMISSION_BITS != 0 {
            return Err(invalid(format!(
                "mode {:o} has bits outside the permission bits 7777",
                self.mode
            )));
        }
        match &self.kind {
            NodeKind::File {
                source: Source::Bytes(bytes),
            } if u32::try_from(bytes.len()).is_err() => Err(invalid(format!(
                "{} bytes is over the newc limit of {} bytes",
                bytes.len(),
                u32::MAX
            ))),
            NodeKind::Symlink { target } => {
                if target.is_empty() {
                    Err(invalid("symlink target is empty".into()))
                } else if target.contains('\0') {
                    Err(invalid("symlink target contains a NUL byte".into()))
                } else if target.len() > MAX_PATH_LEN {
                    Err(invalid("symlink target is longer than 4095 bytes".into()))
                } else {
                    Ok(())
                }
            }
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor }
                if *major > MAX_MAJOR || *minor > MAX_MINOR =>
            {
                Err(invalid(format!(
                    "device number {major}:{minor} does not fit Linux's 12-bit major, 20-bit minor"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The image tree: a sorted map from [`ImagePath`] to [`Node`].
///
/// Invariant: every ancestor of every path is present and is a directory. Ancestors that were
/// never inserted explicitly are directories with mode 0755 and no owner; inserting a
/// directory at such a path later replaces it.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<ImagePath, Node>,
    /// Directories created as parents and not (yet) inserted explicitly.
    implicit: BTreeSet<ImagePath>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Inserts `node` at `path`, creating missing parent directories.
    ///
    /// Inserting a node equal to the one already there is a no-op; a different one is an
    /// error naming the path and both nodes. Nothing changes when an error is returned.
    pub fn insert(&mut self, path: impl AsRef<str>, node: Node) -> Result<()> {
        let path = ImagePath::new(path.as_ref())?;
        node.validate(&path)?;

        let mut missing = Vec::new();
        for parent in path.ancestors() {
            match self.nodes.get(&parent) {
                Some(existing) if existing.is_dir() => {}
                Some(existing) => {
                    return Err(Error::ParentNotDir {
                        kind: existing.kind_name(),
                        path: path.clone(),
                        parent,
                    })
                }
                None => missing.push(parent),
            }
        }

        if let Some(existing) = self.nodes.get(&path) {
            let replaceable =
                self.implicit.contains(&path) && (node.is_dir() || !self.has_children(&path));
            if *existing == node && !replaceable {
                return Ok(());
            }
            if !replaceable {
                return Err(Error::Conflict {
                    existing: existing.describe(),
                    new: node.describe(),
                    path,
                });
            }
            self.implicit.remove(&path);
        }

        for parent in missing {
            self.nodes
                .insert(parent.clone(), Node::dir(IMPLICIT_DIR_MODE));
            self.implicit.insert(parent);
        }
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Inserts every node of `other`, as if its inserts were made here: folders that only
    /// exist there as parents stay implicit here too.
    pub fn merge(&mut self, other: &Tree) -> Result<()> {
        for (path, node) in &other.nodes {
            if !other.implicit.contains(path) {
                self.insert(path.as_str(), node.clone())?;
            }
        }
        Ok(())
    }

    /// Adds a host file tree (typically a Nix store path) at `image_prefix`.
    ///
    /// Directories are walked recursively in sorted name order. Files become
    /// [`Source::Host`] nodes, symlinks keep their target text verbatim (they are not
    /// followed), and every node takes the host mode's permission bits. `host` itself may
    /// be a directory, a file or a symlink. Sockets, FIFOs and device files are errors, as
    /// are names and symlink targets that are not UTF-8. On error the tree may hold the
    /// part of the walk done so far.
    pub fn add_host_tree(
        &mut self,
        image_prefix: impl AsRef<str>,
        host: &Path,
        owner: Option<&str>,
    ) -> Result<()> {
        let prefix = ImagePath::new(image_prefix.as_ref())?;
        self.add_host_node(prefix, host, owner)
    }

    fn add_host_node(&mut self, path: ImagePath, host: &Path, owner: Option<&str>) -> Result<()> {
        let meta =
            fs::symlink_metadata(host).map_err(|e| Error::io("reading metadata of", host, e))?;
        let mut node = host_node(host, &meta)?;
        node.owner = owner.map(str::to_owned);
        let is_dir = node.is_dir();
        self.insert(&path, node)?;
        if is_dir {
            self.add_host_children(&path, host, owner)?;
        }
        Ok(())
    }

    /// Adds the entries of host directory `host` under `path`, which is a directory of the
    /// tree: each child's parent is known to exist, so only the child itself is checked.
    fn add_host_children(
        &mut self,
        path: &ImagePath,
        host: &Path,
        owner: Option<&str>,
    ) -> Result<()> {
        let mut entries = fs::read_dir(host)
            .and_then(|dir| dir.collect::<std::io::Result<Vec<_>>>())
            .map_err(|e| Error::io("reading directory", host, e))?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let child_host = entry.path();
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| Error::NonUtf8 {
                path: child_host.clone(),
                what: "file name",
            })?;
            let child = path.join(name)?;
            // (fstatat on the open directory; like symlink_metadata, it does not follow links)
            let meta = entry
                .metadata()
                .map_err(|e| Error::io("reading metadata of", &child_host, e))?;
            let mut node = host_node(&child_host, &meta)?;
            node.owner = owner.map(str::to_owned);
            let is_dir = node.is_dir();
            self.insert_child(child.clone(), node)?;
            if is_dir {
                self.add_host_children(&child, &child_host, owner)?;
            }
        }
        Ok(())
    }

    /// [`Tree::insert`] for a path whose parent is already a directory of the tree.
    fn insert_child(&mut self, path: ImagePath, node: Node) -> Result<()> {
        if self.nodes.contains_key(&path) {
            return self.insert(&path, node);
        }
        node.validate(&path)?;
        self.nodes.insert(path, node);
        Ok(())
    }

    /// The node at `path`, if any (`None` for invalid paths too).
    pub fn get(&self, path: impl AsRef<str>) -> Option<&Node> {
        let path = ImagePath::new(path.as_ref()).ok()?;
        self.nodes.get(&path)
    }

    /// True if a node exists at `path`.
    pub fn contains(&self, path: impl AsRef<str>) -> bool {
        self.get(path).is_some()
    }

    /// Removes the node at `path` and, for a directory, everything under it. Returns the
    /// node that was at `path`.
    pub fn remove(&mut self, path: impl AsRef<str>) -> Option<Node> {
        let path = ImagePath::new(path.as_ref()).ok()?;
        let doomed: Vec<ImagePath> = self
            .nodes
            .range(path.clone()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(&path))
            .cloned()
            .collect();
        let mut removed = None;
        for p in doomed {
            self.implicit.remove(&p);
            let node = self.nodes.remove(&p);
            if p == path {
                removed = node;
            }
        }
        removed
    }

    /// All nodes in archive order: component-sorted, every directory before its contents.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&ImagePath, &Node)> {
        self.nodes.iter()
    }

    /// Number of nodes, implicit parent directories included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if the tree has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn has_children(&self, dir: &ImagePath) -> bool {
        self.nodes
            .range(dir.clone()..)
            .nth(1)
            .is_some_and(|(p, _)| p.starts_with(dir))
    }
}

impl<'a> IntoIterator for &'a Tree {
    type Item = (&'a ImagePath, &'a Node);
    type IntoIter = std::collections::btree_map::Iter<'a, ImagePath, Node>;
    fn into_iter(self) -> Self::IntoIter {
        self.nodes.iter()
    }
}

fn special_kind(file_type: &fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(tree: &Tree) -> Vec<&str> {
        tree.iter().map(|(p, _)| p.as_str()).collect()
    }

    fn bytes(data: &[u8]) -> Node {
        Node::file(Source::Bytes(data.to_vec()), 0o644)
    }

    #[test]
    fn image_path_rejects_bad_paths_naming_them() {
        for (bad, reason) in [
            ("", "empty path"),
            ("/etc/passwd", "absolute path"),
            ("etc/../passwd", "`..`"),
            ("..", "`..`"),
            ("./etc", "`.`"),
            ("etc//passwd", "empty component"),
            ("etc/", "empty component"),
            ("etc/pa\0ss", "NUL"),
            ("TRAILER!!!", "end-of-archive"),
        ] {
            let err = ImagePath::new(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid image path {bad:?}: ")),
                "{err}"
            );
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
        let long = "a/".repeat(2048) + "b";
        assert!(ImagePath::new(long).is_err());
        assert!(ImagePath::new("x".repeat(256)).is_err());
        assert!(ImagePath::new("x".repeat(255)).is_ok());
        assert!(ImagePath::new("a/TRAILER!!!").is_ok());
        // Found by the proptests and the cpio_roundtrip fuzz target: as a parent it would be an implicit directory named like
        // the end marker, and the kernel would stop reading the archive there.
        let err = ImagePath::new("TRAILER!!!/x").unwrap_err().to_string();
        assert!(err.contains("end-of-archive"), "{err}");
        let mut tree = Tree::new();
        assert!(tree
            .insert("TRAILER!!!/x", Node::file(Source::Bytes(vec![]), 0o644))
            .is_err());
        assert!(tree.is_empty());
    }

    #[test]
    fn image_path_order_puts_subtrees_before_siblings() {
        let mut list: Vec<ImagePath> = ["a-b", "a/b", "a", "a.b", "a/b/c", "a/b-c", "b", "A"]
            .iter()
            .map(|p| ImagePath::new(*p).unwrap())
            .collect();
        list.sort();
        let sorted: Vec<&str> = list.iter().map(ImagePath::as_str).collect();
        assert_eq!(
            sorted,
            ["A", "a", "a/b", "a/b/c", "a/b-c", "a-b", "a.b", "b"]
        );
    }

    #[test]
    fn byte_order_is_component_order() {
        // Every pair of awkward paths: the byte comparison agrees with comparing components.
        let paths = [
            "a",
            "a/b",
            "a-b",
            "a.b",
            "a/b/c",
            "a/b-c",
            "a/bc",
            "ab",
            "a/\u{1}",
            "a\u{1}",
            "b",
            "A",
            "a/b/c/d",
            "a/b.c",
            "\u{7f}",
            "é",
            "é/x",
            "e/é",
            "nix/store/x-1",
            "nix/store/x",
            "nix/store-x",
            "nix/storex/y",
        ];
        for x in paths {
            for y in paths {
                let (px, py) = (ImagePath::new(x).unwrap(), ImagePath::new(y).unwrap());
                assert_eq!(
                    px.cmp(&py),
                    px.components().cmp(py.components()),
                    "{x:?} vs {y:?}"
                );
            }
        }
    }

    #[test]
    fn image_path_helpers() {
        let p = ImagePath::new("nix/store/abc-glibc/lib").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "nix/store/abc-glibc");
        assert_eq!(p.file_name(), "lib");
        assert_eq!(p.to_absolute(), "/nix/store/abc-glibc/lib");
        assert!(p.starts_with(&ImagePath::new("nix/store").unwrap()));
        assert!(!p.starts_with(&ImagePath::new("nix/sto").unwrap()));
        assert_eq!(ImagePath::new("init").unwrap().parent(), None);
        assert!(p.join("../etc").is_err());
    }

    #[test]
    fn insert_creates_parents_in_order() {
        let mut tree = Tree::new();
        tree.insert("nix/store/abc-x/bin/x", bytes(b"x")).unwrap();
        tree.insert("init", Node::symlink("/nix/store/abc-x/bin/x"))
            .unwrap();
        assert_eq!(
            paths(&tree),
            [
                "init",
                "nix",
                "nix/store",
                "nix/store/abc-x",
                "nix/store/abc-x/bin",
                "nix/store/abc-x/bin/x"
            ]
        );
        assert_eq!(tree.get("nix/store").unwrap(), &Node::dir(0o755));
        assert_eq!(tree.len(), 6);
    }

    #[test]
    fn identical_insert_is_fine_different_is_a_conflict() {
        let mut tree = Tree::new();
        tree.insert("etc/passwd", bytes(b"root")).unwrap();
        tree.insert("etc/passwd", bytes(b"root")).unwrap();
        let err = tree
            .insert("etc/passwd", bytes(b"admin"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/passwd: cannot add file 0644 of 5 generated bytes, \
             file 0644 of 4 generated bytes is already there"
        );
        let err = tree
            .insert("etc/passwd/x", bytes(b""))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/passwd/x: parent /etc/passwd is a file, not a directory"
        );
        assert!(!tree.contains("etc/passwd/x"));
    }

    #[test]
    fn explicit_dir_replaces_implicit_parent_once() {
        let mut tree = Tree::new();
        tree.insert("nix/store/abc-x/bin", Node::dir(0o555))
            .unwrap();
        tree.insert(
            "nix/store/abc-x",
            Node::dir(0o555).owned_by("/nix/store/abc-x"),
        )
        .unwrap();
        assert_eq!(tree.get("nix/store/abc-x").unwrap().mode, 0o555);
        let err = tree
            .insert("nix/store/abc-x", Node::dir(0o700))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nix/store/abc-x: cannot add directory 0700"),
            "{err}"
        );
        assert!(err.contains("owned by /nix/store/abc-x"), "{err}");
        // An implicit dir that holds children cannot become a file.
        let err = tree
            .insert("nix/store", bytes(b""))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nix/store: cannot add file"), "{err}");
    }

    #[test]
    fn invalid_nodes_are_rejected_naming_the_path() {
        let mut tree = Tree::new();
        let cases = [
            (Node::dir(0o40755), "mode 40755 has bits outside"),
            (Node::symlink(""), "symlink target is empty"),
            (Node::char_dev(4096, 1, 0o600), "device number 4096:1"),
            (
                Node::block_dev(8, 1 << 20, 0o600),
                "device number 8:1048576",
            ),
        ];
        for (node, reason) in cases {
            let err = tree.insert("dev/x", node).unwrap_err().to_string();
            assert!(err.starts_with("/dev/x: "), "{err}");
            assert!(err.contains(reason), "{err}");
        }
        let err = tree
            .insert("/abs", Node::dir(0o755))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid image path \"/abs\": absolute path"),
            "{err}"
        );
        let err = tree
            .insert("a/../b", Node::dir(0o755))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid image path \"a/../b\""), "{err}");
        assert!(tree.is_empty());
    }

    #[test]
    fn remove_takes_the_subtree() {
        let mut tree = Tree::new();
        tree.insert("a/b/c", bytes(b"c")).unwrap();
        tree.insert("a/b-c", bytes(b"d")).unwrap();
        tree.insert("a-b", bytes(b"e")).unwrap();
        assert!(tree.remove("a/b").unwrap().is_dir());
        assert_eq!(paths(&tree), ["a", "a/b-c", "a-b"]);
        assert_eq!(tree.remove("a/b"), None);
        assert_eq!(tree.remove("/a"), None);
        // The removed implicit dir can come back as a file.
        tree.insert("a/b", bytes(b"b")).unwrap();
        assert!(!tree.get("a/b").unwrap().is_dir());
    }

    #[test]
    fn add_host_tree_walks_sorted_with_host_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("abc-pkg");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("lib")).unwrap();
        fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(root.join("lib/libx.so.1"), b"elf").unwrap();
        fs::set_permissions(
            root.join("lib/libx.so.1"),
            fs::Permissions::from_mode(0o444),
        )
        .unwrap();
        std::os::unix::fs::symlink("libx.so.1", root.join("lib/libx.so")).unwrap();
        fs::set_permissions(root.join("lib"), fs::Permissions::from_mode(0o555)).unwrap();

        let mut tree = Tree::new();
        let owner = "/nix/store/abc-pkg";
        tree.add_host_tree("nix/store/abc-pkg", &root, Some(owner))
            .unwrap();
        fs::set_permissions(root.join("lib"), fs::Permissions::from_mode(0o755)).unwrap();

        assert_eq!(
            paths(&tree),
            [
                "nix",
                "nix/store",
                "nix/store/abc-pkg",
                "nix/store/abc-pkg/bin",
                "nix/store/abc-pkg/bin/tool",
                "nix/store/abc-pkg/lib",
                "nix/store/abc-pkg/lib/libx.so",
                "nix/store/abc-pkg/lib/libx.so.1",
            ]
        );
        let tool = tree.get("nix/store/abc-pkg/bin/tool").unwrap();
        assert_eq!(
            tool,
            &Node::file(Source::Host(root.join("bin/tool")), 0o4755).owned_by(owner)
        );
        assert_eq!(tree.get("nix/store/abc-pkg/lib").unwrap().mode, 0o555);
        assert_eq!(
            tree.get("nix/store/abc-pkg/lib/libx.so.1").unwrap().mode,
            0o444
        );
        assert_eq!(
            tree.get("nix/store/abc-pkg/lib/libx.so").unwrap(),
            &Node::symlink("libx.so.1").owned_by(owner)
        );
        assert_eq!(tree.get("nix/store").unwrap().owner, None);
    }

    #[test]
    fn add_host_tree_accepts_a_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("abc-hello.sh");
        fs::write(&script, b"echo hi\n").unwrap();
        let mut tree = Tree::new();
        tree.add_host_tree("nix/store/abc-hello.sh", &script, None)
            .unwrap();
        assert!(matches!(
            tree.get("nix/store/abc-hello.sh").unwrap().kind,
            NodeKind::File { .. }
        ));
    }

    #[test]
    fn add_host_tree_rejects_special_files_and_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("pkg/control.sock");
        fs::create_dir(dir.path().join("pkg")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
        let mut tree = Tree::new();
        let err = tree
            .add_host_tree("pkg", &dir.path().join("pkg"), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: unsupported file type socket, only files, directories and symlinks \
                 can be copied",
                sock_path.display()
            )
        );

        let missing = dir.path().join("nope");
        let err = tree.add_host_tree("nope", &missing, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "reading metadata of {}: No such file or directory",
                missing.display()
            )
        );
    }

    #[test]
    fn add_host_tree_rejects_non_utf8_names() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
        fs::write(&bad, b"").unwrap();
        let err = Tree::new()
            .add_host_tree("x", dir.path(), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("{}: file name is not valid UTF-8", bad.display())
        );
    }
}
