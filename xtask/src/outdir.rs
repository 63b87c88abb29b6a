//! Guards for an output folder (`out/<board>/`, or `--out <dir>`):
//!
//! - **One build at a time.** A build holds `<parent>/.<name>.lock` (an advisory lock through
//!   `File::try_lock`, with the holder's pid inside) from start to end; a second build of the
//!   same folder fails at once naming the holder. The lock file itself stays (removing it
//!   would race with a build that just opened it).
//! - **No leftovers.** A build writes into `<parent>/.<name>.tmp-*` and swaps it in at the end
//!   ([`swap_in`]) in one atomic step: `renameat2(RENAME_EXCHANGE)` trades the stage folder
//!   and the output folder, so `out/<board>` is the previous output up to that instant and
//!   the new one after it, whatever kills the process. The previous output, now under the
//!   stage's name, is removed afterwards. On SIGINT, SIGTERM or SIGHUP (from the start of
//!   the build, not only once it writes) the stage folder is removed and the process exits
//!   with `128 + signal`; the swap itself is never cut in half. Whatever a killed build
//!   still left behind (`.tmp-*`, `.old-*`) is removed by the next build once it holds the
//!   lock.
//! - **File systems without RENAME_EXCHANGE** get two renames (output aside to
//!   `.<name>.old-<pid>`, stage in). A kill between them leaves no `out/<board>`; the next
//!   build puts the `.old-*` folder back before anything else ([`lock`]).
//! - **Clear errors** when the folder cannot be written, naming what is in the way.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use anyhow::{bail, Context, Result};

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
    recover_swap(parent, &name, out);
    remove_stale(parent, &name);
    Ok(OutLock { _file: file })
}

/// Where the two-rename swap was cut between its steps (`out` gone, the previous output
/// aside as `.<name>.old-*`), puts the previous output back.
fn recover_swap(parent: &Path, name: &str, out: &Path) {
    if out.symlink_metadata().is_ok() {
        return;
    }
    let dir = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let old = format!(".{name}.old-");
    let mut aside: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&old))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    aside.sort();
    if let Some(previous) = aside.pop() {
        if fs::rename(&previous, out).is_ok() {
            crate::ui::detail(format!(
                "restored {} from {} (a build was interrupted while swapping it)",
                out.display(),
                previous.display()
            ));
        }
    }
}

/// Environment variable (tests only): `1` kills the build with SIGKILL between the swap's
/// steps (after the exchange, before the previous output is removed; with the two-rename
/// fallback, between the renames).
pub const KILL_IN_SWAP_ENV: &str = "BONSAI_TEST_KILL_IN_SWAP";
/// Environment variable (tests only): `1` makes [`swap_in`] take the two-rename fallback.
pub const NO_EXCHANGE_ENV: &str = "BONSAI_TEST_NO_RENAME_EXCHANGE";

fn killed_here_in_tests() {
    if std::env::var_os(KILL_IN_SWAP_ENV).is_some_and(|v| v == "1") {
        // SAFETY: kill(2) on our own pid; nothing runs after SIGKILL.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Atomically trades two paths (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if std::env::var_os(NO_EXCHANGE_ENV).is_some_and(|v| v == "1") {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the current directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts the finished `stage` folder in place of `out` in one atomic step (see the module
/// docs), with interrupts held off, then removes the previous output.
pub fn swap_in(staged: Staged, out: &Path) -> Result<()> {
    let (parent, name) = split(out)?;
    let _swap = SWAP.lock().unwrap_or_else(|e| e.into_inner());
    // From here on an interrupt waits, and then has no unfinished output to remove.
    let stage = staged.0.clone();
    drop(staged);
    let stage = stage.as_path();
    let swapped = swap(stage, out, parent, &name);
    if swapped.is_err() {
        // Not swapped in: the stage still holds only the new, unused output.
        let _ = fs::remove_dir_all(stage);
    }
    swapped
}

fn swap(stage: &Path, out: &Path, parent: &Path, name: &str) -> Result<()> {
    let context = || format!("moving the new output into {}", out.display());
    if out.symlink_metadata().is_err() {
        return fs::rename(stage, out).with_context(context);
    }
    match exchange(stage, out) {
        Ok(()) => {
            killed_here_in_tests();
            // The stage's name now holds the previous output; a kill here leaves it for the
            // next build to remove.
            let _ = fs::remove_dir_all(stage);
            Ok(())
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOSYS | libc::ENOTSUP)
            ) =>
        {
            // No RENAME_EXCHANGE here: two renames, recovered by the next build's `lock`.
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            fs::rename(out, &old)
                .with_context(|| format!("moving the previous {} aside", out.display()))?;
            killed_here_in_tests();
            if let Err(e) = fs::rename(stage, out) {
                let _ = fs::rename(&old, out);
                return Err(e).with_context(context);
            }
            let _ = fs::remove_dir_all(&old);
            Ok(())
        }
        Err(e) => Err(e).with_context(context),
    }
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

/// Makes SIGINT, SIGTERM and SIGHUP end the process with the documented message and exit
/// code `128 + signal`, removing any registered stage folder first. Called when a build
/// starts, so an interrupt during Nix or selection is reported like one while packing.
pub fn install_handler() {
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
                // Before packing nothing was written: the previous output is unchanged too.
                eprintln!("error: interrupted ({what}); the unfinished output was removed, the previous one is unchanged");
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
        fs::create_dir_all(&out).unwrap();
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

    /// A two-rename swap cut between its renames (no output, the previous one aside) is
    /// put back by the next build before it removes leftovers.
    #[test]
    fn an_interrupted_two_rename_swap_is_recovered() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("b");
        fs::create_dir_all(d.path().join(".b.old-42")).unwrap();
        fs::write(d.path().join(".b.old-42/build.json"), "previous").unwrap();
        fs::create_dir_all(d.path().join(".b.tmp-x1")).unwrap();
        let _l = lock(d.path(), "b", &out).unwrap();
        assert_eq!(
            fs::read_to_string(out.join("build.json")).unwrap(),
            "previous"
        );
        assert!(!d.path().join(".b.old-42").exists());
        assert!(!d.path().join(".b.tmp-x1").exists());
    }

    /// The swap trades the folders in one step and removes the previous output.
    #[test]
    fn swap_in_trades_the_folders() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("b");
        let stage = d.path().join(".b.tmp-1");
        fs::create_dir_all(&stage).unwrap();
        fs::write(stage.join("f"), "one").unwrap();
        swap_in(track_stage(&stage), &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "one");
        fs::create_dir_all(&stage).unwrap();
        fs::write(stage.join("f"), "two").unwrap();
        exchange(&stage, &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "two");
        assert_eq!(fs::read_to_string(stage.join("f")).unwrap(), "one");
        fs::write(stage.join("f"), "three").unwrap();
        swap_in(track_stage(&stage), &out).unwrap();
        assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "three");
        assert!(!stage.exists(), "the previous output is left");
        assert!(STAGES.lock().unwrap().iter().all(|p| p != &stage));
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
