//! Guards for an output folder (`out/<board>/`, or `--out <dir>`):
//!
//! - **One build at a time.** A build holds `<parent>/.<name>.lock` (an advisory lock through
//!   `File::try_lock`, with the holder's pid inside) from start to end; a second build of the
//!   same folder fails at once naming the holder. The lock file itself stays (removing it
//!   would race with a build that just opened it).
//! - **No leftovers.** A build writes into `<parent>/.<name>.tmp-*` and swaps it in at the end
//!   (see `build.rs`). On SIGINT, SIGTERM or SIGHUP the stage folder is removed before the
//!   process exits (a signal never runs destructors); the swap itself is never cut in half.
//!   Whatever a killed build still left behind (`.tmp-*`, `.old-*`) is removed by the next
//!   build once it holds the lock.
//! - **Clear errors** when the folder cannot be written, naming what is in the way.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use anyhow::{bail, Result};

/// Stage folders to remove if the process is interrupted.
static STAGES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Held while the finished stage is swapped in; an interrupt waits for it.
static SWAP: Mutex<()> = Mutex::new(());

/// The lock of one output folder, held until dropped.
pub struct OutLock {
    _file: File,
}

/// `out`'s parent folder and file name.
fn split(out: &Path) -> Result<(&Path, String)> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "..");
    match (out.parent(), name) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => bail!("output folder {} has no name", out.display()),
    }
}

/// Makes sure `out` can be written: its parent exists (created if needed) and is a folder,
/// and `out` is a folder if it exists. Errors name the path that is in the way.
pub fn check_writable(out: &Path) -> Result<()> {
    let (parent, _) = split(out)?;
    let shown = out.display();
    if !parent.as_os_str().is_empty() {
        if let Err(e) = fs::create_dir_all(parent) {
            if let Some(file) = parent.ancestors().find(|a| a.exists() && !a.is_dir()) {
                bail!(
                    "cannot write the output folder {shown}: {} is a file, not a folder",
                    file.display()
                );
            }
            bail!(
                "cannot write the output folder {shown}: creating {}: {}",
                parent.display(),
                rootfs::io_message(&e)
            );
        }
    }
    if out.exists() && !out.is_dir() {
        bail!("cannot write the output folder {shown}: it is a file, not a folder");
    }
    Ok(())
}

/// Takes the lock of output folder `out` without waiting, then removes what interrupted
/// builds of it left behind. `root` only shortens the path in messages.
pub fn lock(root: &Path, board: &str, out: &Path) -> Result<OutLock> {
    check_writable(out)?;
    let (parent, name) = split(out)?;
    let path = parent.join(format!(".{name}.lock"));
    let shown = path
        .strip_prefix(root)
        .unwrap_or(&path)
        .display()
        .to_string();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot write the output folder {}: creating {}: {}",
                out.display(),
                path.display(),
                rootfs::io_message(&e)
            )
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("held by pid {pid}"),
                Err(_) => "held by another process".to_string(),
            };
            bail!("another build of {board} is running (lock {shown} {holder})");
        }
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("locking {shown}: {}", rootfs::io_message(&e))
        }
    }
    file.set_len(0)
        .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(|e| anyhow::anyhow!("writing {shown}: {}", rootfs::io_message(&e)))?;
    remove_stale(parent, &name);
    Ok(OutLock { _file: file })
}

/// Removes `.<name>.tmp-*` and `.<name>.old-*` beside the output folder. Only called with the
/// lock held, so no running build owns them.
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }) else {
        return;
    };
    let tmp = format!(".{name}.tmp-");
    let old = format!(".{name}.old-");
    for e in entries.flatten() {
        let file_name = e.file_name();
        let n = file_name.to_string_lossy();
        if n.starts_with(&tmp) || n.starts_with(&old) {
            let p = e.path();
            if p.is_dir() {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
            crate::ui::detail(format!(
                "removed {} left by an interrupted build",
                p.display()
            ));
        }
    }
}

/// A stage folder that is removed if the process is interrupted while this is alive.
pub struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let mut stages = STAGES.lock().unwrap_or_else(|e| e.into_inner());
        stages.retain(|p| p != &self.0);
    }
}

/// Registers `stage` for removal on SIGINT/SIGTERM/SIGHUP (installing the handler once).
pub fn track_stage(stage: &Path) -> Staged {
    install_handler();
    STAGES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(stage.to_path_buf());
    Staged(stage.to_path_buf())
}

/// Runs `f` (the swap of the finished output) with interrupts held off until it returns.
pub fn uninterrupted<T>(f: impl FnOnce() -> T) -> T {
    let _swap = SWAP.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        else {
            return; // the next build still removes what this one leaves
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _swap = SWAP.lock().unwrap_or_else(|e| e.into_inner());
                let stages = STAGES.lock().unwrap_or_else(|e| e.into_inner());
                for stage in stages.iter() {
                    // The build may still be writing into it: retry a few times.
                    for _ in 0..5 {
                        if fs::remove_dir_all(stage).is_ok() || !stage.exists() {
                            break;
                        }
                    }
                }
                let what = match sig {
                    SIGINT => "SIGINT",
                    SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                if stages.is_empty() {
                    eprintln!("error: interrupted ({what})");
                } else {
                    eprintln!("error: interrupted ({what}); the unfinished output was removed, the previous one is unchanged");
                }
                std::process::exit(128 + sig);
            }
        });
    });
}

/// Test hook: sleeps for `$var` milliseconds when that variable is set (the interrupt test
/// uses `BONSAI_TEST_PACK_DELAY_MS` to catch a build in the middle of packing).
pub fn test_delay(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Whether `e` (anywhere in its chain) is "no space left on device".
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    let full = |io: &std::io::Error| {
        io.raw_os_error() == Some(28) || io.kind() == std::io::ErrorKind::StorageFull
    };
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(full)
            || matches!(c.downcast_ref::<rootfs::Error>(), Some(rootfs::Error::Io { error, .. }) if full(error))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_anywhere_in_the_chain() {
        let full = anyhow::Error::new(std::io::Error::from_raw_os_error(28)).context("writing x");
        assert!(is_disk_full(&full));
        let wrapped = anyhow::Error::new(rootfs::Error::Io {
            action: "writing",
            path: PathBuf::from("/x"),
            error: std::io::Error::from_raw_os_error(28),
        });
        assert!(is_disk_full(&wrapped));
        let denied = anyhow::Error::new(std::io::Error::from_raw_os_error(13)).context("writing x");
        assert!(!is_disk_full(&denied));
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out/b");
        let first = lock(d.path(), "b", &out).unwrap();
        let e = lock(d.path(), "b", &out).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "another build of b is running (lock out/.b.lock held by pid {})",
                std::process::id()
            )
        );
        drop(first);
        lock(d.path(), "b", &out).unwrap();
    }

    #[test]
    fn stale_stage_folders_are_removed_once_locked() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("b");
        fs::create_dir_all(d.path().join(".b.tmp-x1/sub")).unwrap();
        fs::create_dir_all(d.path().join(".b.old-42")).unwrap();
        fs::create_dir_all(d.path().join(".bb.tmp-x1")).unwrap();
        let _l = lock(d.path(), "b", &out).unwrap();
        assert!(!d.path().join(".b.tmp-x1").exists());
        assert!(!d.path().join(".b.old-42").exists());
        assert!(
            d.path().join(".bb.tmp-x1").exists(),
            "another board's stage"
        );
    }

    #[test]
    fn unwritable_output_names_what_is_in_the_way() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("afile");
        fs::write(&file, "").unwrap();
        let e = check_writable(&file.join("out/b")).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "cannot write the output folder {}: {} is a file, not a folder",
                file.join("out/b").display(),
                file.display()
            )
        );
        let e = check_writable(&file).unwrap_err().to_string();
        assert!(e.ends_with(": it is a file, not a folder"), "{e}");
    }
}
