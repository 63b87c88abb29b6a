//! Not PID 1: `bonsai-init poweroff|reboot|halt` asks PID 1 to shut down.

use std::io::Write;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const USAGE: &str = "usage: bonsai-init poweroff|reboot|halt|--version\n\
    (as PID 1 it is the init; poweroff, reboot and halt signal PID 1 with USR2, TERM, USR1)";

/// What a command line asks for, when bonsai-init is not PID 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Signal(Signal),
    Version,
    /// Hidden: run the supervisor on this config as a normal process, for tests.
    TestMode(String),
    /// Hidden: parse and validate a config, for image builds.
    CheckConfig(String),
    Usage,
}

pub fn parse(args: &[String]) -> Command {
    match args {
        [cmd] => match cmd.as_str() {
            "poweroff" => Command::Signal(Signal::SIGUSR2),
            "reboot" => Command::Signal(Signal::SIGTERM),
            "halt" => Command::Signal(Signal::SIGUSR1),
            "--version" | "-V" => Command::Version,
            _ => Command::Usage,
        },
        [flag, path] if flag == "--test-mode" => Command::TestMode(path.clone()),
        [flag, path] if flag == "--check-config" => Command::CheckConfig(path.clone()),
        _ => Command::Usage,
    }
}

pub fn signal_init(sig: Signal) -> i32 {
    match kill(Pid::from_raw(1), sig) {
        Ok(()) => 0,
        Err(e) => {
            eprint_line(&format!("bonsai-init: cannot signal PID 1: {e}"));
            1
        }
    }
}

pub fn version() -> i32 {
    let _ = writeln!(
        std::io::stdout(),
        "bonsai-init {}",
        env!("CARGO_PKG_VERSION")
    );
    0
}

pub fn usage() -> i32 {
    eprint_line(USAGE);
    2
}

pub fn check_config(path: &str) -> i32 {
    match crate::config::Config::load(path) {
        Ok(_) => 0,
        Err(e) => {
            eprint_line(&format!("bonsai-init: {e}"));
            1
        }
    }
}

fn eprint_line(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Command {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn commands() {
        assert_eq!(p(&["poweroff"]), Command::Signal(Signal::SIGUSR2));
        assert_eq!(p(&["reboot"]), Command::Signal(Signal::SIGTERM));
        assert_eq!(p(&["halt"]), Command::Signal(Signal::SIGUSR1));
        assert_eq!(p(&["--version"]), Command::Version);
        assert_eq!(
            p(&["--test-mode", "/x.json"]),
            Command::TestMode("/x.json".into())
        );
        assert_eq!(
            p(&["--check-config", "/x.json"]),
            Command::CheckConfig("/x.json".into())
        );
        for bad in [&[][..], &["stop"], &["poweroff", "now"], &["--test-mode"]] {
            assert_eq!(p(bad), Command::Usage);
        }
    }
}
