//! The pure core of bonsai: takes files (mostly Nix store paths) and returns an initramfs.
//!
//! This half of the crate packs: a [`Tree`] says what goes into the image, [`write_newc`]
//! turns it into a newc cpio archive, [`compress_writer`] compresses it, [`manifest`]
//! describes it, and [`pack`] writes the compressed archive to disk atomically.
//!
//! Invariants:
//!
//! - **Never runs programs.** Everything here is library code over files and bytes; tests may
//!   spawn GNU `cpio`, `gzip` and `xz` as independent oracles, the crate itself never does.
//! - **Output is a function of the inputs.** No clocks (the mtime is given by the caller, as
//!   `SOURCE_DATE_EPOCH`), no host state in the archive (no host paths, owners, inode
//!   numbers or timestamps), and no hash-map order (trees are sorted maps; gzip cuts its blocks at
//!   fixed places whatever the thread count or the state of its cache; all compressors have fixed headers).
//! - **Every error names what it is about**: the image path, host file or value, in a
//!   lowercase message with no trailing period.

mod compress;
mod cpio;
mod error;
mod hex;
mod host;
mod manifest;
mod pack;
mod piececache;
mod tree;

pub use crate::compress::{compress_writer, Compression, Encoder, XZ_MAX_DICT_SIZE};
pub use crate::cpio::mtime_of;
pub use crate::cpio::{
    write_newc, write_newc_segmented, CpioOptions, CpioStats, Segmented, BUILT_BINARIES,
    STORE_MTIME,
};
pub use crate::error::{io_message, Error, Result};
pub use crate::hex::hex;
pub use crate::manifest::{manifest, EntryType, Manifest, ManifestEntry, Totals, MANIFEST_VERSION};
pub use crate::pack::{pack, pack_cached, write_atomic, PackOptions, PackReport};
pub use crate::piececache::{CacheStats, PieceCache, PruneReport};
pub use crate::tree::{
    ImagePath, Node, NodeKind, Source, Tree, IMPLICIT_DIR_MODE, PERMISSION_BITS,
};
pub mod backends;
mod compose;
pub mod devices;
pub mod faults;
pub mod system;
pub use crate::backends::{Backend, InitInputs};
pub use crate::compose::{compose, ComposeSpec};
mod elf;
pub mod hygiene;
mod policy;
mod populate;
mod prune;
pub mod refs;
mod select;
mod strip;
mod verify;
pub use crate::elf::{modinfo, ElfKind};
pub use crate::policy::{
    DlopenPriority, DlopenThreshold, DropRule, Glob, Policy, PruneClass, StripModules,
};
pub use crate::populate::{
    populate, FileSize, PopulateReport, SizeReport, SizeTotals, StorePathSize,
};
pub use crate::select::{
    roots_from_tree, select, How, Kept, KeptKind, Problem, ProblemKind, PruneCount, Reason, Root,
    SelectSpec, Selection, StorePathInfo,
};
pub use crate::strip::{strip_bytes, StripAction, StripOptions, StripOutcome};
pub use crate::verify::{verify, VerifyReport};
