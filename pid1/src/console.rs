//! The console: log lines, prefixed service output, the clock they are stamped with.

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};

/// `log!("started {name}")` writes `bonsai-init: started …` to the console in one write.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::console::log_line(format_args!($($arg)*))
    };
}
pub(crate) use log;

pub fn log_line(args: fmt::Arguments<'_>) {
    let line = format!("bonsai-init: {args}\n");
    write_console(line.as_bytes());
}

/// Writes everything to fd 1, which is the console; errors are dropped (there is nowhere
/// else to report them).
pub fn write_console(mut buf: &[u8]) {
    // SAFETY: fd 1 is never closed by bonsai-init; if it is not open, write fails with EBADF.
    let fd = unsafe { BorrowedFd::borrow_raw(1) };
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return,
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
                let _ = nix::poll::poll(&mut fds, 100u16);
            }
            Err(_) => return,
        }
    }
}

/// Time since boot (CLOCK_BOOTTIME), the one clock of the supervisor.
pub fn uptime() -> Duration {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => Duration::new(
            u64::try_from(ts.tv_sec()).unwrap_or(0),
            u32::try_from(ts.tv_nsec()).unwrap_or(0),
        ),
        Err(_) => Duration::ZERO,
    }
}

/// `12.345s`, as printed in start lines.
pub fn format_uptime(t: Duration) -> String {
    format!("{}.{:03}s", t.as_secs(), t.subsec_millis())
}

/// Makes fds 0, 1 and 2 refer to the console where the kernel left them closed.
pub fn attach_console(console: &str) {
    let closed: Vec<i32> = (0..3)
        .filter(|fd| fcntl(unsafe_borrow(*fd), FcntlArg::F_GETFD) == Err(Errno::EBADF))
        .collect();
    if closed.is_empty() {
        return;
    }
    // O_NONBLOCK so a serial line without carrier cannot hang the open; cleared below.
    let Ok(fd) = open(
        console,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) else {
        return;
    };
    let _ = fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_RDWR));
    for target in closed {
        if fd.as_raw_fd() != target {
            // SAFETY: dup2 onto a closed descriptor below 3; nothing else owns it.
            unsafe { nix::libc::dup2(fd.as_raw_fd(), target) };
        }
    }
    if fd.as_raw_fd() <= 2 {
        // It became one of the standard fds itself: keep it open.
        std::mem::forget::<OwnedFd>(fd);
    }
}

fn unsafe_borrow(fd: i32) -> BorrowedFd<'static> {
    // SAFETY: only used for F_GETFD, which tolerates a closed descriptor (EBADF).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Longest line kept before it is flushed anyway, so a service printing no newline cannot
/// make bonsai-init grow without bound.
pub const MAX_LINE: usize = 4096;

/// Splits a service's output into lines and prefixes each one.
#[derive(Debug)]
pub struct LineBuffer {
    prefix: Vec<u8>,
    partial: Vec<u8>,
}

impl LineBuffer {
    pub fn new(prefix: &str) -> LineBuffer {
        LineBuffer {
            prefix: prefix.as_bytes().to_vec(),
            partial: Vec::new(),
        }
    }

    /// Appends the complete lines in `data` (prefixed) to `out`; keeps the rest.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for piece in data.split_inclusive(|b| *b == b'\n') {
            let mut piece = piece;
            while !piece.is_empty() {
                let room = MAX_LINE.saturating_sub(self.partial.len()).max(1);
                let (now, later) = piece.split_at(piece.len().min(room));
                self.partial.extend_from_slice(now);
                piece = later;
                if self.partial.ends_with(b"\n") || self.partial.len() >= MAX_LINE {
                    self.emit(out);
                }
            }
        }
    }

    /// The pipe closed: a partial line is written out with a newline.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            self.emit(out);
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        out.append(&mut self.partial);
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(prefix: &str, chunks: &[&str], close: bool) -> String {
        let mut lb = LineBuffer::new(prefix);
        let mut out = Vec::new();
        for c in chunks {
            lb.feed(c.as_bytes(), &mut out);
        }
        if close {
            lb.finish(&mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn prefixes_every_complete_line() {
        assert_eq!(run("[a] ", &["one\ntwo\n"], false), "[a] one\n[a] two\n");
        assert_eq!(run("[a] ", &["\n"], false), "[a] \n");
    }

    #[test]
    fn keeps_partial_lines_until_complete() {
        assert_eq!(run("[a] ", &["on", "e\ntw"], false), "[a] one\n");
        assert_eq!(
            run("[a] ", &["on", "e\ntw", "o\n"], false),
            "[a] one\n[a] two\n"
        );
    }

    #[test]
    fn flushes_a_partial_line_when_the_pipe_closes() {
        assert_eq!(run("[a] ", &["one\ntw"], true), "[a] one\n[a] tw\n");
        assert_eq!(run("[a] ", &["one\n"], true), "[a] one\n");
        assert_eq!(run("[a] ", &[], true), "");
    }

    #[test]
    fn splits_overlong_lines() {
        let long = "x".repeat(MAX_LINE + 10);
        let out = run("> ", &[&long[..100], &long[100..]], true);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), 2 + MAX_LINE);
        assert_eq!(lines[1], format!("> {}", "x".repeat(10)));
    }

    #[test]
    fn uptime_format() {
        assert_eq!(format_uptime(Duration::from_millis(12_345)), "12.345s");
        assert_eq!(format_uptime(Duration::from_millis(7)), "0.007s");
    }
}
