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

/// What `main` prints after `error: `: the chain on one line, except that a list of
/// problems (lines indented by two spaces, as selection and verification report them)
/// keeps one problem per line.
pub fn error_report(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push(if line.starts_with("  ") { '\n' } else { ' ' });
        }
        out.push_str(line);
    }
    out
}

/// A command-line usage error from clap as one line: `invalid value 'x' for '--init <INIT>'
/// [possible values: ...]`, without clap's usage and help lines.
pub fn usage_error(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .collect();
    let joined = lines.join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
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

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn problems_keep_their_lines_everything_else_is_one_line() {
        let e = anyhow::anyhow!("select found 2 problems in profile p:\n  /a: x\n  /b: y")
            .context("assembling");
        assert_eq!(
            error_report(&e),
            "assembling: select found 2 problems in profile p:\n  /a: x\n  /b: y"
        );
        let e = anyhow::anyhow!("one\ntwo");
        assert_eq!(error_report(&e), "one two");
    }
}
