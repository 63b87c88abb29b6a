//! Boot-time setup before any service: hostname, tmpfiles, setup commands (the usual ones
//! carried out natively, see `native.rs`; the others spawned).

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::sys::wait::waitpid;

use crate::config::TmpFile;
use crate::console::log;
use crate::service::Exit;
use crate::spawn::{self, Spec};

pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        log!("sethostname {name} failed: {e}");
    }
}

/// Creates every entry; a failure is logged and the next one is tried.
pub fn apply_tmpfiles(entries: &[TmpFile]) {
    for entry in entries {
        if let Err(e) = apply(entry) {
            log!("tmpfile {} failed: {e}", entry.path());
        }
    }
}

/// Creates or updates one entry. An existing path of the same kind is updated; a path of
/// another kind is an error (nothing is deleted to make room).
pub fn apply(entry: &TmpFile) -> io::Result<()> {
    match entry {
        TmpFile::Dir {
            path,
            mode,
            uid,
            gid,
        } => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(wrong_kind("a directory")),
                Err(_) => DirBuilder::new().recursive(true).mode(0o755).create(path)?,
            }
            finish(path, mode.unwrap_or(0o755), *uid, *gid)
        }
        TmpFile::File {
            path,
            content,
            mode,
            uid,
            gid,
        } => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(wrong_kind("a regular file")),
                Err(_) => make_parent(path)?,
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(content.as_bytes())?;
            finish(path, mode.unwrap_or(0o644), *uid, *gid)
        }
        TmpFile::Symlink { path, target } => match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if std::fs::read_link(path)? != Path::new(target) {
                    std::fs::remove_file(path)?;
                    std::os::unix::fs::symlink(target, path)?;
                }
                Ok(())
            }
            Ok(_) => Err(wrong_kind("a symlink")),
            Err(_) => {
                make_parent(path)?;
                std::os::unix::fs::symlink(target, path)
            }
        },
    }
}

fn make_parent(path: &str) -> io::Result<()> {
    match Path::new(path).parent() {
        Some(dir) => DirBuilder::new().recursive(true).mode(0o755).create(dir),
        None => Ok(()),
    }
}

fn finish(path: &str, mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
    }
    // After chown, which may clear setuid/setgid bits.
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

fn wrong_kind(want: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("exists and is not {want}"),
    )
}

/// Runs each command to completion, in order; a failure is logged and the next one runs.
/// Waiting on the one pid is fine here: no service runs yet, and orphans are reaped later.
pub fn run_commands(commands: &[Vec<String>]) {
    for argv in commands {
        let shown = argv.join(" ");
        if let Some(result) = crate::native::run(argv) {
            if let Err(e) = result {
                log!("setup {shown} failed: {e}");
            }
            continue;
        }
        match spawn::spawn(&Spec::plain(argv)) {
            Err(e) => log!("setup {shown} failed: {e}"),
            Ok(child) => loop {
                match waitpid(child.pid, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        log!("setup {shown}: wait failed: {e}");
                        break;
                    }
                    Ok(status) => {
                        match Exit::from_wait(status) {
                            Some(exit) if !exit.success() => {
                                log!("setup {shown} failed ({exit})")
                            }
                            Some(_) => {}
                            None => continue,
                        }
                        break;
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bonsai-init-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn creates_dirs_files_and_symlinks() {
        let root = scratch("tmpfiles");
        let dir = root.join("var/lib/app");
        let file = root.join("etc/motd");
        let link = root.join("run/current");
        let me = nix::unistd::getuid().as_raw();
        for entry in [
            TmpFile::Dir {
                path: s(&dir),
                mode: Some(0o750),
                uid: Some(me),
                gid: None,
            },
            TmpFile::File {
                path: s(&file),
                content: "hi\n".into(),
                mode: Some(0o640),
                uid: None,
                gid: None,
            },
            TmpFile::Symlink {
                path: s(&link),
                target: s(&dir),
            },
        ] {
            apply(&entry).unwrap();
        }
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "hi\n");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read_link(&link).unwrap(), dir);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn existing_paths_of_the_right_kind_are_updated() {
        let root = scratch("update");
        let file = root.join("f");
        let link = root.join("l");
        apply(&TmpFile::File {
            path: s(&file),
            content: "old old old\n".into(),
            mode: None,
            uid: None,
            gid: None,
        })
        .unwrap();
        apply(&TmpFile::File {
            path: s(&file),
            content: "new\n".into(),
            mode: Some(0o600),
            uid: None,
            gid: None,
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new\n");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o600);
        for target in ["/a", "/b", "/b"] {
            apply(&TmpFile::Symlink {
                path: s(&link),
                target: target.into(),
            })
            .unwrap();
            assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(target));
        }
        apply(&TmpFile::Dir {
            path: s(&root),
            mode: Some(0o711),
            uid: None,
            gid: None,
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o7777, 0o711);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_path_of_another_kind_is_an_error() {
        let root = scratch("kind");
        std::fs::create_dir_all(&root).unwrap();
        let file = root.join("f");
        std::fs::write(&file, "x").unwrap();
        let err = apply(&TmpFile::Dir {
            path: s(&file),
            mode: None,
            uid: None,
            gid: None,
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "exists and is not a directory");
        let err = apply(&TmpFile::Symlink {
            path: s(&root),
            target: "/x".into(),
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "exists and is not a symlink");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
