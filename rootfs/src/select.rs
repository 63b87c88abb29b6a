//! Selection: which files of the closure go into the image, and why.
//!
//! A breadth-first walk with a seen-set, from roots (files or directories of store paths,
//! each with a reason). From every kept file it follows:
//!
//! - **ELF files**: PT_INTERP (for programs; a library reached through DT_NEEDED, or one
//!   with a DT_SONAME, is not run, so its interpreter is not followed — glibc's `libc.so.6`
//!   names `/lib64/ld-linux-x86-64.so.2`). Each DT_NEEDED is searched like ld.so does: a name
//!   with a `/` is a path; otherwise DT_RUNPATH when the object has one, else its DT_RPATH
//!   followed by the DT_RPATHs of the objects that loaded it (each contributing only if it
//!   has no DT_RUNPATH); `$ORIGIN`/`${ORIGIN}` expand to the directory of the object's path
//!   in the store with symlinks resolved (for a library reached through a symlink in another
//!   directory ld.so would use the symlink's directory; store layouts keep such links next to
//!   their targets); other substitutions (`$LIB`, `$PLATFORM`) skip the entry with a warning;
//!   only directories under `/nix/store` are searched; the first candidate that exists wins. **Already loaded:** a name found nowhere is satisfied
//!   by a kept shared object whose DT_SONAME (or file name) is that name — preferring one in
//!   the same directory, then in the same store path — as ld.so reuses a loaded object with
//!   a matching soname. That is how `libc.so.6` (no RUNPATH) finds `ld-linux-x86-64.so.2`:
//!   it is the interpreter of the programs that load it. Otherwise the name is an error
//!   naming the file and its search path, unless `allow-missing` matches it.
//!   `.note.dlopen` entries at or above the `dlopen` threshold are resolved the same way
//!   (alternative sonames in order; a missing `required` one is an error, others warnings).
//!   Every RUNPATH/RPATH directory in the store is a reference to its store path.
//! - **Symlinks**: recreated with the same target text; the target is followed (relative or
//!   absolute, through chains; symlinked directories on the way are kept too). A target in
//!   the store that does not exist is an error unless `allow-dangling` matches.
//! - **Contents**: a `#!` interpreter in the store, and every `/nix/store/<hash>-<name>[/rest]`
//!   string ([`crate::refs`]). In ELF files the strings the dynamic linker reads (interpreter,
//!   DT_NEEDED, RUNPATH, RPATH) and the sections stripping will remove are not scanned. A
//!   reference to a file keeps it; to a directory, the whole directory (minus pruned files);
//!   to a bare store path, the whole store path (reported as a warning); to a path that does
//!   not exist, only the store path's top directory (warning). A reference into a dropped
//!   store path is an error, or is rewritten when its drop rule says `rewrite = true`.
//!
//! Pruning ([`crate::prune`]) applies to files reached through directories (silently,
//! counted per rule) and to references and symlink targets (an error naming the referring
//! file, unless `allow-dangling` matches). Roots — including `keep` globs — are never
//! pruned; libraries resolved for DT_NEEDED/dlopen and interpreters escape the prune
//! classes (their loader needs them) but not `prune-globs`. The `gconv` class's
//! `gconv-modules*` configuration is kept in every gconv directory that keeps a module.
//!
//! Directories are kept as parents of kept files; a directory named by a reference (or
//! empty in the store, inside a kept directory) is kept even when empty.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::elf::{self, ET_DYN};
use crate::error::{Error, Result};
use crate::policy::{DlopenPriority, Glob, GlobSet, Policy};
use crate::prune::{self, PruneRule, Pruner};
use crate::refs::{self, StoreRef, STORE_DIR};
use crate::strip::{self, StripOptions};
use crate::tree::{NodeKind, Source, Tree};

/// Longest chain of symlinks followed in one lookup, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;
/// How many different inherited RPATH chains one file is analysed with, at most.
const MAX_CHAINS_PER_FILE: usize = 8;

/// A starting point of the selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// An absolute path inside a store path: a file, a symlink or a directory (a directory
    /// means everything in it: `…-busybox/bin`).
    pub path: String,
    /// Shown by `why`: `package busybox`, `service ticker`, `init`.
    pub reason: String,
}

impl Root {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Root {
        Root {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// What [`select`] works on.
#[derive(Clone, Copy, Debug)]
pub struct SelectSpec<'a> {
    /// Where `/nix/store` is found on the host: `/` in production, a temporary directory in
    /// tests. Image path `/nix/store/x/…` is host path `<store_root>/nix/store/x/…`; absolute
    /// paths inside files (interpreters, RUNPATHs, symlinks) resolve under it too.
    pub store_root: &'a Path,
    /// The store paths of the closure (absolute): references are matched to them by hash,
    /// and those not kept are reported as vanished.
    pub closure: &'a [String],
    pub roots: &'a [Root],
    pub policy: &'a Policy,
}

/// The result of [`select`]: every kept image entry with the reason it is there.
#[derive(Clone, Debug, Serialize)]
pub struct Selection {
    #[serde(skip)]
    pub store_root: PathBuf,
    /// Absolute image path (`/nix/store/…`) → entry.
    pub entries: BTreeMap<String, Kept>,
    /// Every closure store path (and any other referenced one) with its accounting.
    pub store_paths: BTreeMap<String, StorePathInfo>,
    /// Files whose references to dropped store paths are rewritten → those store paths.
    pub rewrites: BTreeMap<String, BTreeSet<String>>,
    /// Files and bytes pruned on the walk, per rule (`docs`, `glob /…`).
    pub pruned: BTreeMap<String, PruneCount>,
    /// Things worth knowing that did not stop the selection.
    pub warnings: Vec<Problem>,
    /// Kept entries that entries of another store path also refer to: entry → those other
    /// reasons (the first is in [`Kept::reason`]), so every chain into a store path is known.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub also: BTreeMap<String, BTreeSet<Reason>>,
}

/// One kept entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub kind: KeptKind,
    /// Permission bits from the store.
    pub mode: u32,
    /// The store path it belongs to.
    pub store_path: String,
    pub reason: Reason,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum KeptKind {
    File { size: u64 },
    Symlink { target: String },
    Dir,
}

/// Why an entry is kept: what referred to it, and how.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Reason {
    /// The referring entry; `None` for roots.
    pub from: Option<String>,
    pub how: How,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case", tag = "how", content = "detail")]
pub enum How {
    /// A root, with the caller's reason.
    Root(String),
    Interpreter,
    Shebang,
    /// DT_NEEDED with the library name.
    Needed(String),
    /// A `.note.dlopen` soname.
    Dlopen(String),
    SymlinkTarget,
    /// A symlinked directory on the way to the referring entry's target.
    SymlinkInPath,
    TextReference,
    /// A RUNPATH/RPATH directory (keeps only the store path's top directory).
    Runpath,
    /// Inside a kept directory.
    InDirectory,
    /// Parent of a kept entry.
    Parent,
    /// gconv configuration for a kept module.
    GconvConfig,
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::Root(r) => write!(f, "root: {r}"),
            How::Interpreter => f.write_str("interpreter"),
            How::Shebang => f.write_str("#! interpreter"),
            How::Needed(n) => write!(f, "DT_NEEDED {n}"),
            How::Dlopen(n) => write!(f, "dlopen {n}"),
            How::SymlinkTarget => f.write_str("symlink target"),
            How::SymlinkInPath => f.write_str("symlink in path"),
            How::TextReference => f.write_str("text reference"),
            How::Runpath => f.write_str("RUNPATH entry"),
            How::InDirectory => f.write_str("in directory"),
            How::Parent => f.write_str("parent directory"),
            How::GconvConfig => f.write_str("gconv configuration"),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            Some(from) => write!(f, "{} from {from}", self.how),
            None => write!(f, "{}", self.how),
        }
    }
}

/// Accounting for one store path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StorePathInfo {
    /// Something of it is in the image.
    pub kept: bool,
    /// In the `drop` list.
    pub dropped: bool,
    /// Regular files and their bytes in the whole store path.
    pub closure_files: u64,
    pub closure_bytes: u64,
    /// Regular files kept and their bytes (before stripping).
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Kept whole because of a bare reference from this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whole_because: Option<String>,
    /// Only its top directory is kept: it is referenced (RUNPATH, a path that does not
    /// exist) but no file of it is needed. The reason names the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stub_because: Option<Reason>,
}

/// Files and bytes pruned by one rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PruneCount {
    pub files: u64,
    pub bytes: u64,
}

/// A problem with one file: an error (selection or verification fails) or a warning,
/// depending on the list it is in. Displays as one line: `file: message`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// The file (absolute image path), glob or store path the problem is about.
    pub file: String,
    #[serde(flatten)]
    pub kind: ProblemKind,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case", tag = "problem")]
pub enum ProblemKind {
    /// A root that does not exist; `reason` says where it came from (`package hello`,
    /// `referenced by /etc/app.conf`).
    MissingRoot {
        reason: String,
    },
    RootOutsideStore,
    MissingLibrary {
        library: String,
        /// `RUNPATH /a:/b`, `RPATH /a`, or `no RUNPATH or RPATH`.
        search: String,
        /// Store paths holding the library that are dropped.
        dropped: Vec<String>,
    },
    MissingDlopen {
        sonames: Vec<String>,
        priority: DlopenPriority,
        feature: Option<String>,
        search: String,
    },
    MissingInterpreter {
        interpreter: String,
    },
    InterpreterOutsideStore {
        interpreter: String,
    },
    DanglingSymlink {
        target: String,
    },
    SymlinkLoop {
        path: String,
    },
    PrunedReference {
        how: String,
        target: String,
        rule: String,
    },
    DroppedReference {
        how: String,
        store_path: String,
        /// A text reference, which `rewrite = true` in the drop rule would rewrite.
        rewritable: bool,
    },
    MissingTextTarget {
        target: String,
    },
    UnknownReference {
        reference: String,
    },
    KeptWhole {
        store_path: String,
    },
    KeepGlobUnmatched,
    BadDlopenNote {
        reason: String,
    },
    BadElf {
        reason: String,
    },
    UnsupportedRunpath {
        entry: String,
    },
    /// Verification: a store path named in the file is not in the image.
    DanglingReference {
        missing: String,
    },
    Setuid {
        mode: u32,
    },
    WorldWritable {
        mode: u32,
    },
    StripFailed {
        reason: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file)?;
        match &self.kind {
            ProblemKind::MissingRoot { reason } => write!(f, "does not exist ({reason})"),
            ProblemKind::RootOutsideStore => f.write_str("root is not inside a store path"),
            ProblemKind::MissingLibrary {
                library,
                search,
                dropped,
            } => {
                write!(f, "library {library} not found in {search}")?;
                if !dropped.is_empty() {
                    write!(f, " (only in dropped {})", dropped.join(", "))?;
                }
                Ok(())
            }
            ProblemKind::MissingDlopen {
                sonames,
                priority,
                feature,
                search,
            } => {
                write!(f, "dlopen library {} ({priority}", sonames.join(" or "))?;
                if let Some(feature) = feature {
                    write!(f, ", feature {feature}")?;
                }
                write!(f, ") not found in {search}")
            }
            ProblemKind::MissingInterpreter { interpreter } => {
                write!(f, "interpreter {interpreter} does not exist")
            }
            ProblemKind::InterpreterOutsideStore { interpreter } => {
                write!(f, "interpreter {interpreter} is outside {STORE_DIR}")
            }
            ProblemKind::DanglingSymlink { target } => {
                write!(f, "symlink target {target} does not exist")
            }
            ProblemKind::SymlinkLoop { path } => {
                write!(f, "too many levels of symlinks resolving {path}")
            }
            ProblemKind::PrunedReference { how, target, rule } => {
                write!(f, "{how} {target}, which is pruned by {rule}")
            }
            ProblemKind::DroppedReference {
                how,
                store_path,
                rewritable,
            } => {
                write!(f, "{how} {store_path}, which is dropped")?;
                if *rewritable {
                    f.write_str(" (rewrite = true in its drop rule rewrites the reference)")?;
                }
                Ok(())
            }
            ProblemKind::MissingTextTarget { target } => write!(
                f,
                "text reference to {target}, which does not exist; only its store path is kept"
            ),
            ProblemKind::UnknownReference { reference } => write!(
                f,
                "reference to {reference}, which is neither in the closure nor in the store"
            ),
            ProblemKind::KeptWhole { store_path } => {
                write!(f, "bare reference to {store_path}, which is kept whole")
            }
            ProblemKind::KeepGlobUnmatched => f.write_str("keep glob matches nothing"),
            ProblemKind::BadDlopenNote { reason } => f.write_str(reason),
            ProblemKind::BadElf { reason } => {
                write!(f, "not a valid ELF file ({reason}); scanned as data")
            }
            ProblemKind::UnsupportedRunpath { entry } => write!(
                f,
                "RUNPATH/RPATH entry {entry} uses an unsupported substitution; skipped"
            ),
            ProblemKind::DanglingReference { missing } => {
                write!(f, "refers to {missing}, which is not in the image")
            }
            ProblemKind::Setuid { mode } => write!(
                f,
                "mode {mode:04o} has setuid/setgid bits (allow it with allow-setuid)"
            ),
            ProblemKind::WorldWritable { mode } => write!(
                f,
                "mode {mode:04o} is world-writable (allow it with allow-world-writable)"
            ),
            ProblemKind::StripFailed { reason } => write!(f, "left unstripped: {reason}"),
        }
    }
}

impl Selection {
    /// The chain of reasons from `path` back to a root: `path` first.
    pub fn why(&self, path: &str) -> Vec<(String, Reason)> {
        let mut chain = Vec::new();
        let mut seen = BTreeSet::new();
        let mut current = Some(normalize(path));
        while let Some(p) = current {
            if !seen.insert(p.clone()) {
                break;
            }
            let Some(kept) = self.entries.get(&p) else {
                break;
            };
            current = kept.reason.from.clone();
            chain.push((p, kept.reason.clone()));
        }
        chain
    }

    /// Store paths with something in the image.
    pub fn kept_store_paths(&self) -> Vec<&str> {
        self.store_paths
            .iter()
            .filter(|(_, i)| i.kept)
            .map(|(p, _)| p.as_str())
            .collect()
    }

    /// Closure store paths with nothing in the image.
    pub fn vanished_store_paths(&self) -> Vec<&str> {
        self.store_paths
            .iter()
            .filter(|(_, i)| !i.kept)
            .map(|(p, _)| p.as_str())
            .collect()
    }

    /// The host path of an image path.
    pub fn host_path(&self, image: &str) -> PathBuf {
        host_path(&self.store_root, image)
    }
}

fn host_path(root: &Path, image: &str) -> PathBuf {
    root.join(image.trim_start_matches('/'))
}

/// Selects the files of the image. Errors (all of them, sorted) come back as
/// [`Error::Problems`]; I/O failures as the usual errors.
pub fn select(spec: &SelectSpec<'_>) -> Result<Selection> {
    spec.policy.validate()?;
    let mut w = Walker::new(spec)?;
    w.run(spec)?;
    w.finish(spec)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    /// Never pruned.
    Root,
    /// Prune classes do not apply, prune globs are errors.
    Structural,
    /// Pruning is an error.
    Reference,
    /// Pruning is silent.
    Member,
}

enum Visit {
    Kept,
    Missing,
    Outside,
    Loop,
    Pruned(PruneRule),
    Dropped(String),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

struct Lookup {
    path: String,
    kind: Kind,
    /// Symlinks passed through on the way.
    via: Vec<String>,
}

enum Found {
    Yes(Lookup),
    Missing,
    Outside,
    Loop,
}

/// Work on one kept file. A file is scanned once, its interpreter followed once it is
/// reached as something that runs, and its libraries resolved once per inherited RPATH chain.
struct Task {
    path: String,
    /// Resolve DT_NEEDED and dlopen notes with this inherited chain (the DT_RPATH
    /// directories of the objects that loaded this one).
    chain: Option<Vec<String>>,
    /// Follow PT_INTERP (not for objects loaded as libraries).
    exec: bool,
    /// Scan contents, follow `#!` and RUNPATH store references.
    scan: bool,
}

struct Deferred {
    from: String,
    names: Vec<String>,
    search: String,
    dropped: Vec<String>,
    dlopen: Option<(DlopenPriority, Option<String>)>,
}

struct Walker<'a> {
    root: PathBuf,
    policy: &'a Policy,
    pruner: Pruner,
    allow_missing: GlobSet,
    allow_dangling: GlobSet,
    strip: Option<StripOptions>,
    by_hash: BTreeMap<String, String>,
    dropped: BTreeMap<String, bool>,
    entries: BTreeMap<String, Kept>,
    /// Directories kept only because a walk passed through them (dropped if left empty).
    implicit_dirs: BTreeSet<String>,
    expanded: BTreeSet<String>,
    queue: VecDeque<Task>,
    chains: BTreeMap<String, BTreeSet<Vec<String>>>,
    scanned: BTreeSet<String>,
    exec_done: BTreeSet<String>,
    /// soname (and file name) → kept shared objects.
    libs: BTreeMap<String, BTreeSet<String>>,
    deferred: Vec<Deferred>,
    stubs: BTreeMap<String, Reason>,
    whole: BTreeMap<String, String>,
    rewrites: BTreeMap<String, BTreeSet<String>>,
    also: BTreeMap<String, BTreeSet<Reason>>,
    pruned: BTreeMap<String, PruneCount>,
    pruned_seen: BTreeSet<String>,
    gconv_done: BTreeSet<String>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl<'a> Walker<'a> {
    fn new(spec: &SelectSpec<'a>) -> Result<Walker<'a>> {
        let policy = spec.policy;
        let mut by_hash = BTreeMap::new();
        let mut dropped = BTreeMap::new();
        let drop_globs: Vec<(Glob, bool)> = policy
            .drop
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Glob::new(&r.path)
                    .map(|g| (g, r.rewrite))
                    .map_err(|reason| Error::InvalidPolicy {
                        key: format!("drop[{i}]"),
                        reason,
                    })
            })
            .collect::<Result<_>>()?;
        for sp in spec.closure {
            let sp = normalize(sp);
            let Some(hash) = refs::hash_of(&sp) else {
                return Err(Error::InvalidPolicy {
                    key: "closure".into(),
                    reason: format!("{sp} is not a store path"),
                });
            };
            by_hash.insert(hash.to_owned(), sp.clone());
            if let Some((_, rewrite)) = drop_globs.iter().find(|(g, _)| g.matches(&sp)) {
                dropped.insert(sp, *rewrite);
            }
        }
        Ok(Walker {
            root: spec.store_root.to_owned(),
            policy,
            pruner: Pruner::new(policy)?,
            allow_missing: GlobSet::new("allow-missing", &policy.allow_missing)?,
            allow_dangling: GlobSet::new("allow-dangling", &policy.allow_dangling)?,
            strip: policy.strip_enabled().then_some(StripOptions {
                modules: policy.strip_modules(),
            }),
            by_hash,
            dropped,
            entries: BTreeMap::new(),
            implicit_dirs: BTreeSet::new(),
            expanded: BTreeSet::new(),
            queue: VecDeque::new(),
            chains: BTreeMap::new(),
            scanned: BTreeSet::new(),
            exec_done: BTreeSet::new(),
            libs: BTreeMap::new(),
            deferred: Vec::new(),
            stubs: BTreeMap::new(),
            whole: BTreeMap::new(),
            rewrites: BTreeMap::new(),
            also: BTreeMap::new(),
            pruned: BTreeMap::new(),
            pruned_seen: BTreeSet::new(),
            gconv_done: BTreeSet::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        })
    }

    fn host(&self, image: &str) -> PathBuf {
        host_path(&self.root, image)
    }

    fn error(&mut self, file: &str, kind: ProblemKind) {
        self.errors.push(Problem {
            file: file.to_owned(),
            kind,
        });
    }

    fn warn(&mut self, file: &str, kind: ProblemKind) {
        self.warnings.push(Problem {
            file: file.to_owned(),
            kind,
        });
    }

    fn dangling_allowed(&self, from: &str, target: &str) -> bool {
        self.allow_dangling.matches(from) || self.allow_dangling.matches(target)
    }

    fn run(&mut self, spec: &SelectSpec<'_>) -> Result<()> {
        let mut roots: Vec<Root> = spec.roots.to_vec();
        for (i, pattern) in self.policy.keep.iter().enumerate() {
            let glob = Glob::new(pattern).map_err(|reason| Error::InvalidPolicy {
                key: format!("keep[{i}]"),
                reason,
            })?;
            let matches = self.expand_glob(&glob)?;
            if matches.is_empty() {
                self.warn(pattern, ProblemKind::KeepGlobUnmatched);
            }
            roots.extend(
                matches
                    .into_iter()
                    .map(|p| Root::new(p, format!("keep glob {pattern}"))),
            );
        }
        for root in roots {
            let path = normalize(&root.path);
            let Some(sp) = store_path_of(&path) else {
                self.error(&path, ProblemKind::RootOutsideStore);
                continue;
            };
            if self.dropped.contains_key(&sp) {
                self.dropped_reference(&path, format!("root ({}) is in", root.reason), sp);
                continue;
            }
            let reason = Reason {
                from: None,
                how: How::Root(root.reason.clone()),
            };
            match self.visit(&path, reason, Ask::Root, true, None)? {
                Visit::Kept | Visit::Outside => {}
                Visit::Missing => self.error(
                    &path,
                    ProblemKind::MissingRoot {
                        reason: root.reason.clone(),
                    },
                ),
                Visit::Loop => self.error(&path, ProblemKind::SymlinkLoop { path: path.clone() }),
                Visit::Pruned(_) => {}
                Visit::Dropped(sp) => self.dropped_reference(&path, "root resolves into", sp),
            }
        }
        loop {
            while let Some(task) = self.queue.pop_front() {
                self.analyze(task)?;
            }
            if !self.gconv_pass()? && self.queue.is_empty() {
                break;
            }
        }
        self.resolve_deferred();
        Ok(())
    }

    /// Every path of the closure matching `glob`, found by walking only where it may match.
    fn expand_glob(&self, glob: &Glob) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for sp in self.by_hash.values() {
            if glob.may_match_below(sp) || glob.matches(sp) {
                self.glob_walk(glob, sp, &mut out)?;
            }
        }
        out.sort();
        Ok(out)
    }

    fn glob_walk(&self, glob: &Glob, path: &str, out: &mut Vec<String>) -> Result<()> {
        let host = self.host(path);
        let meta = match fs::symlink_metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("reading metadata of", host, e)),
        };
        if glob.matches(path) {
            out.push(path.to_owned());
            if meta.is_dir() {
                return Ok(());
            }
        }
        if meta.is_dir() && glob.may_match_below(path) {
            for name in read_dir_sorted(&host)? {
                self.glob_walk(glob, &format!("{path}/{name}"), out)?;
            }
        }
        Ok(())
    }

    /// Resolves `path` component by component under the store root, following symlinks
    /// (the last one too with `follow_last`). Leaves the store → `Outside`.
    fn lookup(&self, path: &str, follow_last: bool) -> Result<Found> {
        let mut pending: VecDeque<String> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let mut cur = String::new();
        let mut kind = Kind::Dir;
        let mut via = Vec::new();
        let mut hops = 0;
        while let Some(comp) = pending.pop_front() {
            match comp.as_str() {
                "." => continue,
                ".." => {
                    cur = parent(&cur).to_owned();
                    continue;
                }
                _ => {}
            }
            if kind != Kind::Dir {
                return Ok(Found::Missing); // a file used as a directory
            }
            let next = format!("{cur}/{comp}");
            if next != "/nix" && next != STORE_DIR && store_path_of(&next).is_none() {
                return Ok(Found::Outside);
            }
            let host = self.host(&next);
            let meta = match fs::symlink_metadata(&host) {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                    return Ok(Found::Missing)
                }
                Err(e) => return Err(Error::io("reading metadata of", host, e)),
            };
            if meta.file_type().is_symlink() && (follow_last || !pending.is_empty()) {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Ok(Found::Loop);
                }
                let target = read_link(&host)?;
                via.push(next);
                let mut comps: Vec<String> = target
                    .split('/')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect();
                comps.extend(pending.drain(..));
                pending = comps.into();
                if target.starts_with('/') {
                    cur = String::new();
                }
                kind = Kind::Dir;
                continue;
            }
            kind = if meta.file_type().is_symlink() {
                Kind::Symlink
            } else if meta.is_dir() {
                Kind::Dir
            } else {
                Kind::File
            };
            cur = next;
        }
        if store_path_of(&cur).is_none() {
            return Ok(Found::Outside);
        }
        Ok(Found::Yes(Lookup {
            path: cur,
            kind,
            via,
        }))
    }

    /// Keeps `path` (a file, symlink or directory; directories with their subtree when
    /// `subtree`). `lib` is the inherited RPATH chain when it is loaded as a library.
    fn visit(
        &mut self,
        path: &str,
        reason: Reason,
        ask: Ask,
        subtree: bool,
        lib: Option<&[String]>,
    ) -> Result<Visit> {
        let found = match self.lookup(path, false)? {
            Found::Yes(f) => f,
            Found::Missing => return Ok(Visit::Missing),
            Found::Outside => return Ok(Visit::Outside),
            Found::Loop => return Ok(Visit::Loop),
        };
        let sp = store_path_of(&found.path).expect("lookup returns store paths");
        if self.dropped.contains_key(&sp) {
            return Ok(Visit::Dropped(sp));
        }
        self.keep_links_on_the_way(path, &reason, &found.via)?;
        if self.entries.contains_key(&found.path) {
            self.note_also(&found.path, reason);
            self.revisit(&found.path, ask, subtree, lib)?;
            return Ok(Visit::Kept);
        }
        if let Some(rule) = self.prune_rule(&found.path, found.kind == Kind::Dir, ask)? {
            return Ok(Visit::Pruned(rule));
        }
        self.keep_new(found, sp, reason, ask, subtree, lib)?;
        Ok(Visit::Kept)
    }

    /// Records `reason` for the kept entry `path` when it comes from another store path and
    /// is not the entry's first reason: one more chain into that store path.
    fn note_also(&mut self, path: &str, reason: Reason) {
        let Some(kept) = self.entries.get(path) else {
            return;
        };
        let other = reason
            .from
            .as_deref()
            .and_then(store_path_of)
            .is_some_and(|from| from != kept.store_path);
        if other && kept.reason != reason {
            self.also.entry(path.to_owned()).or_default().insert(reason);
        }
    }

    /// Keeps the symlinks a lookup of `path` passed through (`via`), those in dropped store
    /// paths excepted, as symlinks only.
    fn keep_links_on_the_way(&mut self, path: &str, reason: &Reason, via: &[String]) -> Result<()> {
        for link in via {
            let via_reason = Reason {
                from: reason.from.clone().or_else(|| Some(path.to_owned())),
                how: How::SymlinkInPath,
            };
            if let Some(sp) = store_path_of(link) {
                if !self.dropped.contains_key(&sp) {
                    self.keep_symlink_only(link, via_reason)?;
                }
            }
        }
        Ok(())
    }

    /// Visits an entry kept already: a directory reached with `subtree` is expanded once, and
    /// is no longer implicit when asked for as more than a member; a file is scheduled again
    /// (a new RPATH chain, or now as something that runs); a symlink reached again as a library
    /// has its target visited with this chain.
    fn revisit(
        &mut self,
        real: &str,
        ask: Ask,
        subtree: bool,
        lib: Option<&[String]>,
    ) -> Result<()> {
        let Some(existing) = self.entries.get(real).map(|k| k.kind.clone()) else {
            return Ok(());
        };
        match existing {
            KeptKind::Dir if subtree && !self.expanded.contains(real) => {
                if ask != Ask::Member {
                    self.implicit_dirs.remove(real);
                }
                self.expand(real)?;
            }
            KeptKind::Dir if ask != Ask::Member => {
                self.implicit_dirs.remove(real);
            }
            KeptKind::File { .. } => {
                self.schedule(real, lib.unwrap_or(&[]), lib.is_some());
            }
            KeptKind::Symlink { target } if lib.is_some() => {
                // Reached again as a library: its target may need a new RPATH chain.
                let target = symlink_target_path(real, &target);
                if store_path_of(&target).is_some() {
                    let reason = Reason {
                        from: Some(real.to_owned()),
                        how: How::SymlinkTarget,
                    };
                    self.visit(&target, reason, Ask::Structural, false, lib)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The prune rule that removes `real` when asked for this way: never for a root, only a
    /// prune glob for a structural need, and not a gconv configuration next to kept modules.
    /// Counts what a member's rule removes.
    fn prune_rule(&mut self, real: &str, is_dir: bool, ask: Ask) -> Result<Option<PruneRule>> {
        if ask == Ask::Root {
            return Ok(None);
        }
        let Some(rule) = self.pruner.check(real, is_dir) else {
            return Ok(None);
        };
        // gconv configuration stays next to kept modules.
        let gconv_config_needed = rule == PruneRule::Class(crate::policy::PruneClass::Gconv)
            && Pruner::is_gconv_config(real)
            && prune::gconv_dir(real).is_some_and(|d| self.gconv_done.contains(d));
        let applies =
            !gconv_config_needed && (ask != Ask::Structural || matches!(rule, PruneRule::Glob(_)));
        if !applies {
            return Ok(None);
        }
        if ask == Ask::Member {
            self.count_pruned(real, &rule)?;
        }
        Ok(Some(rule))
    }

    /// Keeps an entry met for the first time, in store path `sp`: a symlink, and its target
    /// followed; a directory, expanded with `subtree` (implicit when only a member and not
    /// empty); a file, scheduled for analysis.
    fn keep_new(
        &mut self,
        found: Lookup,
        sp: String,
        reason: Reason,
        ask: Ask,
        subtree: bool,
        lib: Option<&[String]>,
    ) -> Result<()> {
        let real = found.path;
        let host = self.host(&real);
        let meta =
            fs::symlink_metadata(&host).map_err(|e| Error::io("reading metadata of", &host, e))?;
        let mode = meta.permissions().mode() & crate::tree::PERMISSION_BITS;
        match found.kind {
            Kind::Symlink => {
                let target = read_link(&host)?;
                self.entries.insert(
                    real.clone(),
                    Kept {
                        kind: KeptKind::Symlink {
                            target: target.clone(),
                        },
                        mode: 0o777,
                        store_path: sp,
                        reason,
                    },
                );
                self.follow_symlink(&real, &target, ask, subtree, lib)?;
            }
            Kind::Dir => {
                let empty = read_dir_sorted(&host)?.is_empty();
                self.entries.insert(
                    real.clone(),
                    Kept {
                        kind: KeptKind::Dir,
                        mode,
                        store_path: sp,
                        reason,
                    },
                );
                if ask == Ask::Member && !empty {
                    self.implicit_dirs.insert(real.clone());
                }
                if subtree {
                    self.expand(&real)?;
                }
            }
            Kind::File => {
                self.entries.insert(
                    real.clone(),
                    Kept {
                        kind: KeptKind::File { size: meta.len() },
                        mode,
                        store_path: sp,
                        reason,
                    },
                );
                self.schedule(&real, lib.unwrap_or(&[]), lib.is_some());
            }
        }
        Ok(())
    }

    /// Follows a newly kept symlink `link` to `target` when that is in the store: a member's
    /// target is asked for as a reference and without its subtree. A loop, or a target that
    /// is missing, pruned or dropped, is an error on the link.
    fn follow_symlink(
        &mut self,
        link: &str,
        target: &str,
        ask: Ask,
        subtree: bool,
        lib: Option<&[String]>,
    ) -> Result<()> {
        let target_path = symlink_target_path(link, target);
        if store_path_of(&target_path).is_none() {
            return Ok(()); // outside the store: /etc/…, /run/…
        }
        if let Found::Loop = self.lookup(link, true)? {
            self.error(
                link,
                ProblemKind::SymlinkLoop {
                    path: link.to_owned(),
                },
            );
            return Ok(());
        }
        let next_ask = match ask {
            Ask::Member => Ask::Reference,
            other => other,
        };
        let next_subtree = subtree && ask != Ask::Member;
        let target_reason = Reason {
            from: Some(link.to_owned()),
            how: How::SymlinkTarget,
        };
        let visit = self.visit(&target_path, target_reason, next_ask, next_subtree, lib)?;
        self.symlink_target_problem(link, target_path, visit);
        Ok(())
    }

    /// Records what is wrong with a symlink whose target was visited as `visit`: a loop, or
    /// (unless `allow-dangling` covers it) a missing or pruned target; a dropped one always.
    fn symlink_target_problem(&mut self, link: &str, target_path: String, visit: Visit) {
        match visit {
            Visit::Kept | Visit::Outside => {}
            Visit::Missing => {
                if !self.dangling_allowed(link, &target_path) {
                    self.error(
                        link,
                        ProblemKind::DanglingSymlink {
                            target: target_path,
                        },
                    );
                }
            }
            Visit::Loop => self.error(link, ProblemKind::SymlinkLoop { path: target_path }),
            Visit::Pruned(rule) => self.pruned_reference(link, "symlink to", target_path, &rule),
            Visit::Dropped(sp) => self.dropped_reference(link, "symlink into", sp),
        }
    }

    /// A reference from `from` to `target` that `rule` pruned away: an error unless
    /// `allow-dangling` covers either end.
    fn pruned_reference(&mut self, from: &str, how: &str, target: String, rule: &PruneRule) {
        if !self.dangling_allowed(from, &target) {
            self.error(
                from,
                ProblemKind::PrunedReference {
                    how: how.into(),
                    target,
                    rule: rule.to_string(),
                },
            );
        }
    }

    /// A reference from `from` into `store_path`, which the policy drops: an error that
    /// `rewrite = true` cannot mend (it is no text reference).
    fn dropped_reference(&mut self, from: &str, how: impl Into<String>, store_path: String) {
        self.error(
            from,
            ProblemKind::DroppedReference {
                how: how.into(),
                store_path,
                rewritable: false,
            },
        );
    }

    /// Keeps a symlink met on the way to something else, without following its target
    /// (the lookup went through it already).
    fn keep_symlink_only(&mut self, link: &str, reason: Reason) -> Result<()> {
        if self.entries.contains_key(link) {
            return Ok(());
        }
        let target = read_link(&self.host(link))?;
        let sp = store_path_of(link).expect("symlinks in lookups are in the store");
        self.entries.insert(
            link.to_owned(),
            Kept {
                kind: KeptKind::Symlink { target },
                mode: 0o777,
                store_path: sp,
                reason,
            },
        );
        Ok(())
    }

    fn expand(&mut self, dir: &str) -> Result<()> {
        self.expanded.insert(dir.to_owned());
        for name in read_dir_sorted(&self.host(dir))? {
            let child = format!("{dir}/{name}");
            let reason = Reason {
                from: Some(dir.to_owned()),
                how: How::InDirectory,
            };
            match self.visit(&child, reason, Ask::Member, true, None)? {
                Visit::Kept | Visit::Pruned(_) | Visit::Outside | Visit::Dropped(_) => {}
                Visit::Missing => {} // raced away; nothing to keep
                Visit::Loop => self.error(
                    &child,
                    ProblemKind::SymlinkLoop {
                        path: child.clone(),
                    },
                ),
            }
        }
        Ok(())
    }

    fn count_pruned(&mut self, path: &str, rule: &PruneRule) -> Result<()> {
        if !self.pruned_seen.insert(path.to_owned()) {
            return Ok(());
        }
        let (files, bytes) = tree_size(&self.host(path))?;
        let count = self.pruned.entry(rule.key()).or_default();
        count.files += files;
        count.bytes += bytes;
        Ok(())
    }

    fn schedule(&mut self, path: &str, chain: &[String], as_library: bool) {
        let scan = self.scanned.insert(path.to_owned());
        let exec = !as_library && self.exec_done.insert(path.to_owned());
        let chains = self.chains.entry(path.to_owned()).or_default();
        let new_chain = chains.len() < MAX_CHAINS_PER_FILE && chains.insert(chain.to_vec());
        if scan || exec || new_chain {
            self.queue.push_back(Task {
                path: path.to_owned(),
                chain: new_chain.then(|| chain.to_vec()),
                exec,
                scan,
            });
        }
    }

    fn analyze(&mut self, task: Task) -> Result<()> {
        let host = self.host(&task.path);
        let data = fs::read(&host).map_err(|e| Error::io("reading", &host, e))?;
        let mut exclude = Vec::new();
        if elf::is_elf(&data) {
            match elf::parse(&data) {
                Ok(file) => self.analyze_elf(&task, &file, &data, &mut exclude)?,
                Err(reason) => {
                    if task.scan {
                        self.warn(&task.path, ProblemKind::BadElf { reason })
                    }
                }
            }
        } else if let (true, Some(interp)) = (task.scan, shebang(&data)) {
            if store_path_of(&interp).is_some() {
                let reason = Reason {
                    from: Some(task.path.clone()),
                    how: How::Shebang,
                };
                self.structural(&task.path, &interp, reason, "#! interpreter")?;
            }
        }
        if task.scan {
            let mut seen = BTreeSet::new();
            for r in refs::scan_excluding(&data, &exclude) {
                if seen.insert((r.hash.clone(), r.name.clone(), r.rest.clone())) {
                    self.text_reference(&task.path, &r)?;
                }
            }
        }
        Ok(())
    }

    /// Visits an interpreter: missing, pruned or dropped is an error naming `from`.
    fn structural(&mut self, from: &str, target: &str, reason: Reason, what: &str) -> Result<()> {
        match self.visit(target, reason, Ask::Structural, false, None)? {
            Visit::Kept => {}
            Visit::Missing | Visit::Outside | Visit::Loop => {
                if !self.allow_missing.matches(target) {
                    self.error(
                        from,
                        ProblemKind::MissingInterpreter {
                            interpreter: target.to_owned(),
                        },
                    );
                }
            }
            Visit::Pruned(rule) => self.error(
                from,
                ProblemKind::PrunedReference {
                    how: what.to_owned(),
                    target: target.to_owned(),
                    rule: rule.to_string(),
                },
            ),
            Visit::Dropped(sp) => self.dropped_reference(from, format!("{what} is in"), sp),
        }
        Ok(())
    }

    fn analyze_elf(
        &mut self,
        task: &Task,
        file: &elf::ElfFile,
        data: &[u8],
        exclude: &mut Vec<std::ops::Range<usize>>,
    ) -> Result<()> {
        let path = task.path.as_str();
        let info = elf::dynamic_info(file, data);
        exclude.extend(info.string_ranges.iter().cloned());
        if let Some(opts) = &self.strip {
            exclude.extend(strip::removed_ranges(file, opts));
        }
        if file.e_type == ET_DYN {
            let name = path.rsplit('/').next().unwrap_or(path).to_owned();
            self.libs.entry(name).or_default().insert(path.to_owned());
            if let Some(soname) = &info.soname {
                self.libs
                    .entry(soname.clone())
                    .or_default()
                    .insert(path.to_owned());
            }
        }

        if let Some(interp) = &info.interpreter {
            // A library with a soname (glibc's libc.so.6 names /lib64/ld-linux…) is not run.
            let runs = task.exec && !(file.e_type == ET_DYN && info.soname.is_some());
            if runs {
                if store_path_of(&normalize(interp)).is_some() {
                    let reason = Reason {
                        from: Some(path.to_owned()),
                        how: How::Interpreter,
                    };
                    self.structural(path, &normalize(interp), reason, "interpreter")?;
                } else if !self.allow_missing.matches(interp) {
                    self.error(
                        path,
                        ProblemKind::InterpreterOutsideStore {
                            interpreter: interp.clone(),
                        },
                    );
                }
            }
        }

        let Some(chain) = &task.chain else {
            return Ok(());
        };
        let origin = parent(path).to_owned();
        let runpath = info
            .runpath
            .as_deref()
            .map(|r| self.expand_dirs(path, r, &origin));
        let rpath = info
            .rpath
            .as_deref()
            .map(|r| self.expand_dirs(path, r, &origin));
        if task.scan {
            for dir in runpath.iter().chain(rpath.iter()).flatten() {
                if let Some(sp) = store_path_of(dir) {
                    self.store_reference(path, &sp, How::Runpath, "RUNPATH/RPATH entry in")?;
                }
            }
        }
        let (label, search): (&str, Vec<String>) = match (&runpath, &rpath) {
            (Some(r), _) => ("RUNPATH", r.clone()),
            (None, Some(r)) => {
                let mut dirs = r.clone();
                dirs.extend(chain.iter().cloned());
                ("RPATH", dirs)
            }
            (None, None) => ("RPATH of its loaders", chain.clone()),
        };
        let search_text = if search.is_empty() {
            "no RUNPATH or RPATH".to_owned()
        } else {
            format!("{label} {}", search.join(":"))
        };
        let mut inherited: Vec<String> = match (&runpath, &rpath) {
            (None, Some(r)) => r.clone(),
            _ => Vec::new(),
        };
        for dir in chain {
            if !inherited.contains(dir) {
                inherited.push(dir.clone());
            }
        }

        for name in &info.needed {
            self.library(
                path,
                std::slice::from_ref(name),
                &search,
                &search_text,
                &inherited,
                None,
            )?;
        }

        match elf::dlopen_notes(file, data) {
            Ok(entries) => {
                let threshold = self.policy.dlopen_threshold();
                for entry in entries {
                    if threshold.admits(entry.priority) && !entry.sonames.is_empty() {
                        self.library(
                            path,
                            &entry.sonames,
                            &search,
                            &search_text,
                            &inherited,
                            Some((entry.priority, entry.feature.clone())),
                        )?;
                    }
                }
            }
            Err(reason) => self.warn(path, ProblemKind::BadDlopenNote { reason }),
        }
        Ok(())
    }

    /// Splits a RUNPATH/RPATH, expanding `$ORIGIN`; entries that are empty, relative, or use
    /// other substitutions are skipped (the latter with a warning).
    fn expand_dirs(&mut self, path: &str, value: &str, origin: &str) -> Vec<String> {
        let mut out = Vec::new();
        for entry in value.split(':') {
            let expanded = entry
                .replace("${ORIGIN}", origin)
                .replace("$ORIGIN", origin);
            if expanded.contains('$') {
                self.warn(
                    path,
                    ProblemKind::UnsupportedRunpath {
                        entry: entry.to_owned(),
                    },
                );
                continue;
            }
            if !expanded.starts_with('/') {
                continue;
            }
            let dir = normalize(&expanded);
            if !out.contains(&dir) {
                out.push(dir);
            }
        }
        out
    }

    /// Resolves a DT_NEEDED name (or dlopen alternatives): first existing candidate in the
    /// search path wins; else it is checked against loaded sonames at the end.
    fn library(
        &mut self,
        from: &str,
        names: &[String],
        search: &[String],
        search_text: &str,
        inherited: &[String],
        dlopen: Option<(DlopenPriority, Option<String>)>,
    ) -> Result<()> {
        let mut dropped = Vec::new();
        for name in names {
            let candidates: Vec<String> = if name.contains('/') {
                if name.starts_with('/') {
                    vec![normalize(name)]
                } else {
                    Vec::new()
                }
            } else {
                search
                    .iter()
                    .filter(|d| store_path_of(d).is_some())
                    .map(|d| format!("{d}/{name}"))
                    .collect()
            };
            for candidate in candidates {
                let Found::Yes(found) = self.lookup(&candidate, true)? else {
                    continue;
                };
                if found.kind != Kind::File {
                    continue;
                }
                let sp = store_path_of(&found.path).expect("lookup returns store paths");
                if self.dropped.contains_key(&sp) {
                    if !dropped.contains(&sp) {
                        dropped.push(sp);
                    }
                    continue;
                }
                let how = match dlopen {
                    Some(_) => How::Dlopen(name.clone()),
                    None => How::Needed(name.clone()),
                };
                let reason = Reason {
                    from: Some(from.to_owned()),
                    how,
                };
                match self.visit(&candidate, reason, Ask::Structural, false, Some(inherited))? {
                    Visit::Kept => return Ok(()),
                    Visit::Pruned(rule) => {
                        self.error(
                            from,
                            ProblemKind::PrunedReference {
                                how: format!("library {name} is"),
                                target: candidate,
                                rule: rule.to_string(),
                            },
                        );
                        return Ok(());
                    }
                    Visit::Dropped(sp) => {
                        if !dropped.contains(&sp) {
                            dropped.push(sp);
                        }
                    }
                    Visit::Missing | Visit::Outside | Visit::Loop => {}
                }
            }
        }
        self.deferred.push(Deferred {
            from: from.to_owned(),
            names: names.to_vec(),
            search: search_text.to_owned(),
            dropped,
            dlopen,
        });
        Ok(())
    }

    /// Names nowhere in their search path: satisfied by an already loaded object with that
    /// soname, else a problem.
    fn resolve_deferred(&mut self) {
        for d in std::mem::take(&mut self.deferred) {
            let found = d
                .names
                .iter()
                .find_map(|n| self.loaded(&d.from, n).map(|p| (n.clone(), p.clone())));
            if let Some((name, path)) = found {
                // Satisfied by an object already loaded: one more chain into its store path.
                let reason = Reason {
                    from: Some(d.from.clone()),
                    how: match d.dlopen {
                        Some(_) => How::Dlopen(name),
                        None => How::Needed(name),
                    },
                };
                self.note_also(&path, reason);
                continue;
            }
            let allowed = d.names.iter().any(|n| self.allow_missing.matches(n));
            match d.dlopen {
                None => {
                    let kind = ProblemKind::MissingLibrary {
                        library: d.names[0].clone(),
                        search: d.search,
                        dropped: d.dropped,
                    };
                    if allowed {
                        self.warn(&d.from, kind);
                    } else {
                        self.error(&d.from, kind);
                    }
                }
                Some((priority, feature)) => {
                    let kind = ProblemKind::MissingDlopen {
                        sonames: d.names,
                        priority,
                        feature,
                        search: d.search,
                    };
                    if allowed || priority < DlopenPriority::Required {
                        self.warn(&d.from, kind);
                    } else {
                        self.error(&d.from, kind);
                    }
                }
            }
        }
    }

    /// A kept shared object loaded under `name`: same directory first, then same store path.
    fn loaded(&self, from: &str, name: &str) -> Option<&String> {
        let candidates = self.libs.get(name)?;
        let dir = parent(from);
        let sp = store_path_of(from);
        candidates
            .iter()
            .find(|c| parent(c) == dir)
            .or_else(|| candidates.iter().find(|c| store_path_of(c) == sp))
            .or_else(|| candidates.iter().next())
    }

    /// A reference to a whole store path that needs no file of it (RUNPATH entries, paths
    /// that do not exist): the store path stays in the image as its top directory.
    fn store_reference(&mut self, from: &str, sp: &str, how: How, what: &str) -> Result<()> {
        match self.dropped.get(sp) {
            Some(true) => {
                self.rewrites
                    .entry(from.to_owned())
                    .or_default()
                    .insert(sp.to_owned());
            }
            Some(false) => {
                if !self.dangling_allowed(from, sp) {
                    self.error(
                        from,
                        ProblemKind::DroppedReference {
                            how: what.to_owned(),
                            store_path: sp.to_owned(),
                            rewritable: true,
                        },
                    );
                }
            }
            None => {
                let reason = Reason {
                    from: Some(from.to_owned()),
                    how,
                };
                let Ok(meta) = fs::symlink_metadata(self.host(sp)) else {
                    self.warn(
                        from,
                        ProblemKind::UnknownReference {
                            reference: sp.to_owned(),
                        },
                    );
                    return Ok(());
                };
                if !meta.is_dir() {
                    // A store path that is a single file: the file is what is referenced.
                    self.visit(sp, reason, Ask::Root, false, None)?;
                } else {
                    self.stubs.entry(sp.to_owned()).or_insert(reason);
                }
            }
        }
        Ok(())
    }

    fn text_reference(&mut self, from: &str, r: &StoreRef) -> Result<()> {
        let sp = match self.by_hash.get(&r.hash) {
            Some(sp) => sp.clone(),
            None => {
                let guess = r.store_path();
                if r.name.is_empty() || !self.host(&guess).exists() {
                    self.warn(
                        from,
                        ProblemKind::UnknownReference {
                            reference: r.text(),
                        },
                    );
                    return Ok(());
                }
                self.by_hash.insert(r.hash.clone(), guess.clone());
                guess
            }
        };
        let sp_name = sp
            .strip_prefix(STORE_DIR)
            .and_then(|s| s.get(1 + refs::HASH_LEN + 1..))
            .unwrap_or("");
        let rest = if r.name == sp_name {
            r.rest.as_str()
        } else {
            ""
        };
        let rest = rest.trim_end_matches('/');

        match self.dropped.get(&sp) {
            Some(true) => {
                self.rewrites
                    .entry(from.to_owned())
                    .or_default()
                    .insert(sp.clone());
                return Ok(());
            }
            Some(false) => {
                return self.store_reference(from, &sp, How::TextReference, "text reference to");
            }
            None => {}
        }

        if rest.is_empty() {
            if store_path_of(from).as_deref() == Some(sp.as_str()) {
                return Ok(()); // its own store path: already in the image
            }
            let reason = Reason {
                from: Some(from.to_owned()),
                how: How::TextReference,
            };
            if !self.whole.contains_key(&sp) {
                self.whole.insert(sp.clone(), from.to_owned());
                self.warn(
                    from,
                    ProblemKind::KeptWhole {
                        store_path: sp.clone(),
                    },
                );
            }
            self.visit(&sp, reason, Ask::Reference, true, None)?;
            return Ok(());
        }

        let mut target = normalize(&format!("{sp}{rest}"));
        let mut found = matches!(self.lookup(&target, false)?, Found::Yes(_));
        while !found && (target.ends_with('.') || target.ends_with('-')) {
            target.pop();
            found = matches!(self.lookup(&target, false)?, Found::Yes(_));
        }
        if !found {
            self.warn(
                from,
                ProblemKind::MissingTextTarget {
                    target: normalize(&format!("{sp}{rest}")),
                },
            );
            return self.store_reference(from, &sp, How::TextReference, "text reference to");
        }
        let reason = Reason {
            from: Some(from.to_owned()),
            how: How::TextReference,
        };
        match self.visit(&target, reason, Ask::Reference, true, None)? {
            Visit::Kept | Visit::Outside | Visit::Missing => {}
            Visit::Loop => self.error(from, ProblemKind::SymlinkLoop { path: target }),
            Visit::Pruned(rule) => self.pruned_reference(from, "text reference to", target, &rule),
            Visit::Dropped(sp) => self.dropped_reference(from, "text reference resolves into", sp),
        }
        Ok(())
    }

    /// Keeps the `gconv-modules*` configuration next to every kept gconv module.
    fn gconv_pass(&mut self) -> Result<bool> {
        let dirs: BTreeSet<String> = self
            .entries
            .iter()
            .filter(|(p, k)| {
                matches!(k.kind, KeptKind::File { .. })
                    && prune::gconv_dir_entry(p).is_some_and(|n| n.ends_with(".so"))
            })
            .map(|(p, _)| parent(p).to_owned())
            .filter(|d| !self.gconv_done.contains(d))
            .collect();
        let mut progressed = false;
        for dir in dirs {
            self.gconv_done.insert(dir.clone());
            let module = self
                .entries
                .keys()
                .find(|p| parent(p) == dir && p.ends_with(".so"))
                .cloned();
            for name in read_dir_sorted(&self.host(&dir))? {
                let path = format!("{dir}/{name}");
                if Pruner::is_gconv_config(&path) && !self.entries.contains_key(&path) {
                    let reason = Reason {
                        from: module.clone(),
                        how: How::GconvConfig,
                    };
                    self.visit(&path, reason, Ask::Root, true, None)?;
                    progressed = true;
                }
            }
        }
        Ok(progressed)
    }

    fn finish(mut self, spec: &SelectSpec<'_>) -> Result<Selection> {
        // Walk-only directories that ended up empty go.
        for dir in std::mem::take(&mut self.implicit_dirs).into_iter().rev() {
            let prefix = format!("{dir}/");
            let has_children = self
                .entries
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(p, _)| p.starts_with(&prefix));
            if !has_children {
                self.entries.remove(&dir);
            }
        }
        // Store paths only referenced: their top directory.
        for (sp, reason) in std::mem::take(&mut self.stubs) {
            let prefix = format!("{sp}/");
            let has_any = self.entries.contains_key(&sp)
                || self
                    .entries
                    .range(prefix.clone()..)
                    .next()
                    .is_some_and(|(p, _)| p.starts_with(&prefix));
            if has_any {
                continue;
            }
            let host = self.host(&sp);
            let meta = fs::symlink_metadata(&host)
                .map_err(|e| Error::io("reading metadata of", &host, e))?;
            let mode = meta.permissions().mode() & crate::tree::PERMISSION_BITS;
            self.entries.insert(
                sp.clone(),
                Kept {
                    kind: KeptKind::Dir,
                    mode,
                    store_path: sp.clone(),
                    reason: reason.clone(),
                },
            );
            self.stubs.insert(sp, reason);
        }
        // Parents of kept entries, inside their store paths.
        let paths: Vec<String> = self.entries.keys().cloned().collect();
        for path in paths {
            let Some(sp) = store_path_of(&path) else {
                continue;
            };
            let mut child = path.clone();
            let mut dir = parent(&path).to_owned();
            while dir.len() >= sp.len() && !self.entries.contains_key(&dir) {
                let host = self.host(&dir);
                let meta = fs::symlink_metadata(&host)
                    .map_err(|e| Error::io("reading metadata of", &host, e))?;
                self.entries.insert(
                    dir.clone(),
                    Kept {
                        kind: KeptKind::Dir,
                        mode: meta.permissions().mode() & crate::tree::PERMISSION_BITS,
                        store_path: sp.clone(),
                        reason: Reason {
                            from: Some(child.clone()),
                            how: How::Parent,
                        },
                    },
                );
                child = dir.clone();
                dir = parent(&dir).to_owned();
            }
        }

        let mut store_paths: BTreeMap<String, StorePathInfo> = BTreeMap::new();
        let mut all: BTreeSet<String> = spec.closure.iter().map(|p| normalize(p)).collect();
        all.extend(self.by_hash.values().cloned());
        for sp in all {
            let (files, bytes) = match fs::symlink_metadata(self.host(&sp)) {
                Ok(_) => tree_size(&self.host(&sp))?,
                Err(_) => (0, 0),
            };
            store_paths.insert(
                sp.clone(),
                StorePathInfo {
                    dropped: self.dropped.contains_key(&sp),
                    closure_files: files,
                    closure_bytes: bytes,
                    whole_because: self.whole.get(&sp).cloned(),
                    stub_because: self.stubs.get(&sp).cloned(),
                    ..StorePathInfo::default()
                },
            );
        }
        for kept in self.entries.values() {
            let info = store_paths.entry(kept.store_path.clone()).or_default();
            info.kept = true;
            if let KeptKind::File { size } = kept.kind {
                info.kept_files += 1;
                info.kept_bytes += size;
            }
        }

        self.errors.sort();
        self.errors.dedup();
        if !self.errors.is_empty() {
            return Err(Error::Problems {
                step: "select",
                problems: self.errors,
            });
        }
        self.warnings.sort();
        self.warnings.dedup();
        Ok(Selection {
            store_root: self.root,
            entries: self.entries,
            store_paths,
            rewrites: self.rewrites,
            pruned: self.pruned,
            warnings: self.warnings,
            also: self.also,
        })
    }
}

/// Roots for what the rest of the image refers to: every store reference in the files and
/// symlink targets of `tree` outside `/nix/store` (generated `/init`, `/etc` files, `/bin`
/// links, overlay files). A reference to a path keeps that path; a bare store path keeps the
/// whole store path. The reason names the referring entry (`referenced by /bin/sh`).
pub fn roots_from_tree(tree: &Tree) -> Result<Vec<Root>> {
    let mut roots: BTreeMap<String, String> = BTreeMap::new();
    for (path, node) in tree {
        if path.as_str().starts_with("nix/store/") || path.as_str() == "nix/store" {
            continue;
        }
        let data: std::borrow::Cow<'_, [u8]> = match &node.kind {
            NodeKind::File {
                source: Source::Bytes(bytes),
            } => bytes.as_slice().into(),
            NodeKind::File {
                source: Source::Host(host),
            } => fs::read(host)
                .map_err(|e| Error::io("reading", host, e))?
                .into(),
            NodeKind::Symlink { target } => target.as_bytes().into(),
            _ => continue,
        };
        for r in refs::scan(&data) {
            let target = normalize(&r.text());
            roots
                .entry(target)
                .or_insert_with(|| format!("referenced by {}", path.to_absolute()));
        }
    }
    Ok(roots
        .into_iter()
        .map(|(path, reason)| Root::new(path, reason))
        .collect())
}

/// `/nix/store/<hash>-<name>` of a path inside a store path.
pub(crate) fn store_path_of(path: &str) -> Option<String> {
    let (base, _) = refs::split_store_path(path)?;
    Some(format!("{STORE_DIR}/{base}"))
}

/// Resolves `.`, `..` and repeated slashes of an absolute path (`..` stops at `/`).
pub(crate) fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where a symlink at `link` with `target` text points, as a normalized absolute path.
fn symlink_target_path(link: &str, target: &str) -> String {
    if target.starts_with('/') {
        normalize(target)
    } else {
        normalize(&format!("{}/{target}", parent(link)))
    }
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "",
        Some(i) => &path[..i],
    }
}

fn read_link(host: &Path) -> Result<String> {
    fs::read_link(host)
        .map_err(|e| Error::io("reading symlink", host, e))?
        .into_os_string()
        .into_string()
        .map_err(|_| Error::NonUtf8 {
            path: host.to_owned(),
            what: "symlink target",
        })
}

fn read_dir_sorted(host: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = fs::read_dir(host).map_err(|e| Error::io("reading directory", host, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading directory", host, e))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| Error::NonUtf8 {
                path: entry.path(),
                what: "file name",
            })?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Regular files under `host` (itself included) and their bytes; symlinks are not followed.
pub(crate) fn tree_size(host: &Path) -> Result<(u64, u64)> {
    let meta = fs::symlink_metadata(host).map_err(|e| Error::io("reading metadata of", host, e))?;
    if meta.is_file() {
        return Ok((1, meta.len()));
    }
    if !meta.is_dir() {
        return Ok((0, 0));
    }
    let (mut files, mut bytes) = (0, 0);
    let entries = fs::read_dir(host).map_err(|e| Error::io("reading directory", host, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading directory", host, e))?;
        let (f, b) = tree_size(&entry.path())?;
        files += f;
        bytes += b;
    }
    Ok((files, bytes))
}

/// The interpreter path of a `#!` line.
fn shebang(data: &[u8]) -> Option<String> {
    let line = data.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|b| *b == b'\n').unwrap_or(line.len())];
    let text = std::str::from_utf8(line).ok()?.trim_start();
    let interp = text.split([' ', '\t', '\r']).next()?;
    (!interp.is_empty()).then(|| normalize(interp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_and_parent() {
        assert_eq!(
            normalize("/nix/store/a/bin/../lib//x/./y"),
            "/nix/store/a/lib/x/y"
        );
        assert_eq!(normalize("/../../etc"), "/etc");
        assert_eq!(parent("/nix/store/a"), "/nix/store");
        assert_eq!(parent("/nix"), "");
    }

    #[test]
    fn shebang_lines() {
        assert_eq!(
            shebang(b"#! /nix/store/x/bin/sh -e\necho").as_deref(),
            Some("/nix/store/x/bin/sh")
        );
        assert_eq!(shebang(b"#!/bin/sh").as_deref(), Some("/bin/sh"));
        assert_eq!(shebang(b"echo"), None);
        assert_eq!(shebang(b"#!\n"), None);
    }

    #[test]
    fn problems_display_as_one_line() {
        let p = Problem {
            file: "/nix/store/x-foo/bin/foo".into(),
            kind: ProblemKind::MissingLibrary {
                library: "libbar.so.1".into(),
                search: "RUNPATH /nix/store/a/lib:/nix/store/b/lib".into(),
                dropped: vec![],
            },
        };
        assert_eq!(
            p.to_string(),
            "/nix/store/x-foo/bin/foo: library libbar.so.1 not found in RUNPATH \
             /nix/store/a/lib:/nix/store/b/lib"
        );
    }
}
