//! Starting a child: std's `Command` does the fork and exec (it builds argv and envp before
//! forking and reports exec failures through a pipe); `pre_exec` only makes async-signal-safe
//! calls (setsid, signal mask and dispositions, an ioctl), so nothing allocates between fork
//! and exec. SIGCHLD must never be set to SIG_IGN: std reaps a child whose exec failed itself.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal};
use nix::unistd::Pid;

/// Signals bonsai-init ignores; children get them back at their default.
pub const IGNORED_SIGNALS: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGPIPE,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

/// Where a child's stdout and stderr go.
#[derive(Debug, Clone, Copy)]
pub enum Out<'a> {
    /// A pipe whose read end is returned, for line prefixing.
    Pipe,
    /// Appended to a file, its directory created if missing.
    File(&'a str),
    /// bonsai-init's own stdout and stderr (the console).
    Inherit,
    /// The console as stdin, stdout, stderr and controlling terminal (emergency shell).
    Tty(&'a str),
}

#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub argv: &'a [String],
    /// Added to `PATH=/bin`, in order; a later `PATH` wins.
    pub env: &'a [(String, String)],
    pub cwd: &'a str,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub out: Out<'a>,
}

impl<'a> Spec<'a> {
    /// A plain command: cwd `/`, no extra environment, output on the console.
    pub fn plain(argv: &'a [String]) -> Spec<'a> {
        Spec {
            argv,
            env: &[],
            cwd: "/",
            uid: None,
            gid: None,
            out: Out::Inherit,
        }
    }
}

#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// The read end of the output pipe for [`Out::Pipe`].
    pub pipe: Option<OwnedFd>,
}

pub fn spawn(spec: &Spec<'_>) -> io::Result<Spawned> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    // Checked here because exec's error would not say that it is about the directory.
    if !Path::new(spec.cwd).is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("working directory {} does not exist", spec.cwd),
        ));
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/bin")
        .current_dir(spec.cwd);
    for (key, value) in spec.env {
        cmd.env(key, value);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    // std does setgid, then setgroups(0) when root, then setuid.
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    let mut pipe = None;
    let tty = match spec.out {
        Out::Pipe => {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            cmd.stdin(dev_null()?)
                .stdout(write.try_clone()?)
                .stderr(write);
            pipe = Some(read);
            false
        }
        Out::File(path) => {
            let file = open_log(path)?;
            cmd.stdin(dev_null()?)
                .stdout(file.try_clone()?)
                .stderr(file);
            false
        }
        Out::Inherit => {
            cmd.stdin(dev_null()?)
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit());
            false
        }
        Out::Tty(console) => {
            let tty = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(nix::libc::O_NOCTTY)
                .open(console)?;
            cmd.stdin(tty.try_clone()?)
                .stdout(tty.try_clone()?)
                .stderr(tty);
            true
        }
    };
    // SAFETY: the closure only calls async-signal-safe functions and does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            // bonsai-init blocks the signals it reads from its signalfd; std keeps the mask.
            nix::sys::signal::SigSet::empty().thread_set_mask()?;
            for sig in IGNORED_SIGNALS {
                nix::sys::signal::signal(sig, SigHandler::SigDfl)?;
            }
            if tty {
                // Best effort: the shell still works without job control.
                nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0);
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = i32::try_from(child.id())
        .map(Pid::from_raw)
        .map_err(|_| io::Error::other("child pid out of range"))?;
    // Dropping a std Child neither waits nor kills; bonsai-init reaps with waitpid(-1).
    drop(child);
    Ok(Spawned { pid, pipe })
}

/// stdin for services: /dev/null, or an empty pipe if /dev is not there yet.
fn dev_null() -> io::Result<Stdio> {
    match std::fs::File::open("/dev/null") {
        Ok(f) => Ok(Stdio::from(f)),
        Err(_) => {
            let (read, _write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            Ok(Stdio::from(read))
        }
    }
}

fn open_log(path: &str) -> io::Result<std::fs::File> {
    if let Some(dir) = Path::new(path).parent() {
        DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn wait(pid: Pid) -> nix::sys::wait::WaitStatus {
        nix::sys::wait::waitpid(pid, None).unwrap()
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).unwrap();
        s
    }

    #[test]
    fn clears_the_environment_and_sets_cwd() {
        let a = argv(&[
            "/bin/sh",
            "-c",
            "echo \"$PATH|$FOO|$HOME\"; pwd; echo err >&2",
        ]);
        let env = [("FOO".to_string(), "bar".to_string())];
        let mut spec = Spec::plain(&a);
        spec.env = &env;
        spec.cwd = "/tmp";
        spec.out = Out::Pipe;
        let s = spawn(&spec).unwrap();
        let out = read_all(s.pipe.unwrap());
        assert_eq!(out, "/bin|bar|\n/tmp\nerr\n");
        assert_eq!(wait(s.pid), nix::sys::wait::WaitStatus::Exited(s.pid, 0));
    }

    #[test]
    fn child_gets_its_own_session() {
        let a = argv(&["/bin/sh", "-c", "exit 0"]);
        let mut spec = Spec::plain(&a);
        spec.out = Out::Pipe;
        let s = spawn(&spec).unwrap();
        // The child is a session leader, so its process group id is its pid.
        let pgid = nix::unistd::getpgid(Some(s.pid));
        wait(s.pid);
        if let Ok(pgid) = pgid {
            assert_eq!(pgid, s.pid);
        }
    }

    #[test]
    fn appends_to_a_file_and_creates_its_directory() {
        let dir = std::env::temp_dir().join(format!("bonsai-init-spawn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = dir.join("log/current");
        let log_s = log.to_str().unwrap().to_string();
        let a = argv(&["/bin/sh", "-c", "echo hello"]);
        for _ in 0..2 {
            let mut spec = Spec::plain(&a);
            spec.out = Out::File(&log_s);
            let s = spawn(&spec).unwrap();
            assert!(s.pipe.is_none());
            wait(s.pid);
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nhello\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let a = argv(&["/nonexistent/program"]);
        let err = spawn(&Spec::plain(&a)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(spawn(&Spec::plain(&[])).is_err());
        let a = argv(&["/bin/true"]);
        let mut spec = Spec::plain(&a);
        spec.cwd = "/nonexistent/dir";
        let err = spawn(&spec).unwrap_err();
        assert_eq!(
            err.to_string(),
            "working directory /nonexistent/dir does not exist"
        );
    }
}
