//! The one error type of the crate. Every message names the image path, host file or value
//! it is about; messages are lowercase with no trailing period.

use std::io;
use std::path::PathBuf;

use crate::compress::Compression;
use crate::select::Problem;
use crate::tree::ImagePath;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building or packing an image tree.
///
/// Image paths are shown as they appear on the booted system (`/etc/passwd`), host paths as
/// given. I/O causes are part of the message (and not exposed as `source()`), so a report
/// chain never prints them twice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The service description or init backend cannot be rendered.
    #[error("{message}")]
    Compose { message: String },

    /// A path inside the image failed validation.
    #[error("invalid image path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },

    /// A node cannot be stored at its path (bad mode, device number, symlink target, size).
    #[error("/{path}: {reason}")]
    InvalidNode { path: ImagePath, reason: String },

    /// A different node is already at this path.
    #[error("/{path}: cannot add {new}, {existing} is already there")]
    Conflict {
        path: ImagePath,
        existing: String,
        new: String,
    },

    /// An ancestor of the path exists but is not a directory.
    #[error("/{path}: parent /{parent} is a {kind}, not a directory")]
    ParentNotDir {
        path: ImagePath,
        parent: ImagePath,
        kind: &'static str,
    },

    /// A host file name or symlink target is not UTF-8 (image paths and targets must be).
    #[error("{}: {what} is not valid UTF-8", path.display())]
    NonUtf8 { path: PathBuf, what: &'static str },

    /// A host file is neither a regular file, a directory nor a symlink.
    #[error(
        "{}: unsupported file type {kind}, only files, directories and symlinks can be copied",
        path.display()
    )]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    /// A [`Source::Host`](crate::Source::Host) path is not a regular file.
    #[error("{}: is a {kind}, expected a regular file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },

    /// An I/O operation on a host file failed.
    #[error("{action} {}: {}", path.display(), io_message(error))]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// A host file grew or shrank between opening and reading it.
    #[error(
        "{}: size changed while packing ({expected} bytes when opened, {found} when read)",
        path.display()
    )]
    SizeChanged {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    /// A host file does not fit the newc format's 32-bit size field.
    #[error("{}: {size} bytes is over the newc limit of {} bytes", path.display(), u32::MAX)]
    TooLarge { path: PathBuf, size: u64 },

    /// Writing an entry to the archive output failed.
    #[error("writing archive entry /{path}: {}", io_message(error))]
    WriteEntry { path: ImagePath, error: io::Error },

    /// Writing the closing `TRAILER!!!` entry or flushing the archive failed.
    #[error("writing the archive {what}: {}", io_message(error))]
    WriteArchive {
        what: &'static str,
        error: io::Error,
    },

    /// Fewer bytes than announced in the header went into an entry.
    #[error("/{path}: wrote {written} of {expected} bytes to the archive")]
    ShortWrite {
        path: ImagePath,
        written: u64,
        expected: u64,
    },

    /// A compression name that is not one of the supported ones.
    #[error("unknown compression {name:?}, expected one of: none, gzip, zstd, xz")]
    UnknownCompression { name: String },

    /// A compression level outside what the compressor accepts.
    #[error("{compression} compression level {level} is out of range {min}..={max}")]
    InvalidLevel {
        compression: Compression,
        level: u32,
        min: u32,
        max: u32,
    },

    /// The compressor library refused its settings.
    #[error("setting up {compression} compression: {}", io_message(error))]
    CompressorSetup {
        compression: Compression,
        error: io::Error,
    },

    /// A compression level was given together with `none`.
    #[error("compression level {level} given, but compression is none")]
    LevelWithoutCompression { level: u32 },

    /// An output path without a file name (`/`, `..`).
    #[error("{}: output path has no file name", path.display())]
    InvalidOutput { path: PathBuf },

    /// Selection or verification found problems; each displays as one line naming its file.
    #[error("{step} found {}", problem_list(problems))]
    Problems {
        step: &'static str,
        problems: Vec<Problem>,
    },

    /// A key of the image policy (or an input list) is invalid.
    #[error("image policy key {key}: {reason}")]
    InvalidPolicy { key: String, reason: String },

    /// Moving the finished temporary file into place failed.
    #[error("renaming {} to {}: {}", from.display(), to.display(), io_message(error))]
    Rename {
        from: PathBuf,
        to: PathBuf,
        error: io::Error,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, error: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            error,
        }
    }
}

/// `2 problems: a; b`.
fn problem_list(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    let plural = if problems.len() == 1 { "" } else { "s" };
    format!("{} problem{plural}: {}", problems.len(), lines.join("; "))
}

/// The OS message without std's ` (os error N)` suffix: `No such file or directory`.
pub fn io_message(error: &io::Error) -> String {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => match text.strip_suffix(&format!(" (os error {code})")) {
            Some(bare) => bare.to_owned(),
            None => text,
        },
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_message_drops_os_error_suffix() {
        let err = Error::io(
            "reading",
            "/nix/store/aaaa-bash/bin/sh",
            io::Error::from_raw_os_error(2),
        );
        assert_eq!(
            err.to_string(),
            "reading /nix/store/aaaa-bash/bin/sh: No such file or directory"
        );
    }

    #[test]
    fn io_message_keeps_custom_errors() {
        let err = Error::io("writing", "out", io::Error::other("disk on fire"));
        assert_eq!(err.to_string(), "writing out: disk on fire");
    }
}
