//! Progress output: short status lines on stderr, with elapsed time on long steps.

use std::io::IsTerminal;
use std::time::Instant;

/// How much progress output to print (`-q`, default, `-v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Quiet,
    Normal,
    Verbose,
}

static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

pub fn set_level(l: Level) {
    LEVEL.store(l as u8, std::sync::atomic::Ordering::Relaxed);
}

pub fn level() -> Level {
    match LEVEL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Level::Quiet,
        1 => Level::Normal,
        _ => Level::Verbose,
    }
}

/// Prints a progress line (`==> what`) on stderr; colour only on a terminal and never with NO_COLOR.
pub fn step(msg: impl AsRef<str>) {
    if level() == Level::Quiet {
        return;
    }
    if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        eprintln!("\x1b[1;32m==>\x1b[0m {}", msg.as_ref());
    } else {
        eprintln!("==> {}", msg.as_ref());
    }
}

/// Prints an indented detail line on stderr.
pub fn detail(msg: impl AsRef<str>) {
    if level() == Level::Quiet {
        return;
    }
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
