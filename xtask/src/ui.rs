//! Progress output: short status lines on stderr, with elapsed time on long steps.

use std::io::IsTerminal;
use std::time::Instant;

/// Prints a progress line (`==> what`) on stderr.
pub fn step(msg: impl AsRef<str>) {
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        eprintln!("\x1b[1;32m==>\x1b[0m {}", msg.as_ref());
    } else {
        eprintln!("==> {}", msg.as_ref());
    }
}

/// Prints an indented detail line on stderr.
pub fn detail(msg: impl AsRef<str>) {
    eprintln!("    {}", msg.as_ref());
}

pub fn warn(msg: impl AsRef<str>) {
    eprintln!("warning: {}", msg.as_ref());
}

/// A timer for "done in 1.2 s" summaries.
pub struct Timer(Instant);

impl Timer {
    pub fn start() -> Timer {
        Timer(Instant::now())
    }
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// An error chain on one line: `outer: inner: cause`.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// Bytes as a short human figure: 1.4 MiB.
pub fn size(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if b >= K * K {
        format!("{:.2} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{bytes} B")
    }
}
