//! The console protocol between a guest under test and the host.
//!
//! QEMU's exit status proves nothing about the guest, so the guest reports on its serial
//! console and the host reads QEMU's stdout line by line. This module is the host side: the
//! constants, the kernel parameters and the line parser. The guest side is a shell script
//! generated into the image; it must follow the rules below exactly.
//!
//! # Kernel command line
//!
//! The host appends [`kernel_params`] to the board's command line:
//!
//! ```text
//! bonsai.nonce=<16 lowercase hex chars> bonsai.check=1
//! ```
//!
//! The nonce is fresh for every run ([`new_nonce`]), so output from an earlier run, a stale
//! log or the kernel echoing its own command line can never pass for a marker. `bonsai.check=1`
//! tells the init to run the checks and power off instead of staying up. Both parameters
//! contain a dot, so the kernel passes neither to init as an argument or an environment
//! variable: the guest reads them from `/proc/cmdline`.
//!
//! # Markers
//!
//! Each marker is one line of its own on the console (`/dev/console`, or the init's stdout when
//! that is the console). Fields are separated by single spaces; `<nonce>` is the nonce from the
//! command line, `<uptime>` the first field of `/proc/uptime` (seconds, a decimal such as
//! `3.14`), `<seconds>` of `BONSAI-SERVICES-UP` the kernel log's timestamp of that moment (the
//! clock of the kernel's own `[    0.756022]` prefixes, such as that of its `Run /init` line),
//! `<index>` the check's position in the check list counting from 1, `<label>` a word
//! without spaces.
//!
//! ```text
//! BONSAI-READY <nonce> <uptime>                  once, as soon as the init is up
//! BONSAI-SERVICES-UP <nonce> <seconds>           optional, when every service has started
//! BONSAI-TIME <nonce> <label> <uptime>           optional, any number, for boot charts
//! BONSAI-CHECK-BEGIN <nonce> <index>             before check <index> runs
//! ...the check's output (stdout and stderr)...
//! BONSAI-CHECK-END <nonce> <index> <exit-code>   after it, with its exit code
//! BONSAI-DONE <nonce>                            after the last check
//! BONSAI-HOST <nonce> qmp <command> [<json>]      a request: the host runs QMP <command> with
//!                                                 the arguments object <json> (no spaces)
//! ```
//!
//! After `BONSAI-DONE` the guest runs `reboot -f`; QEMU runs with `-no-reboot`, so it exits.
//!
//! A marker must start its line. The host strips carriage returns at the start and whitespace
//! at the end of every line, and nothing else, so `[    1.23] ... BONSAI-READY ...` (a kernel
//! message) or `Command line: ... bonsai.nonce=...` is never a marker. A line whose nonce is
//! not this run's is ordinary console text. Kernel messages may appear between markers and
//! between the lines of a check's output; boards should boot with `quiet` or a low `loglevel`
//! so they stay rare.
//!
//! A check's output must end with a newline, or the END marker would not start a line. Capture
//! it with a command substitution (which drops trailing newlines) and print it back with one:
//!
//! ```sh
//! nonce=$(sed -n 's/.*bonsai\.nonce=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
//! up() { read -r u _ < /proc/uptime; echo "$u"; }
//! printf 'BONSAI-READY %s %s\n' "$nonce" "$(up)"
//!
//! printf 'BONSAI-CHECK-BEGIN %s %d\n' "$nonce" 1
//! out=$(uname -r 2>&1); rc=$?
//! [ -n "$out" ] && printf '%s\n' "$out"
//! printf 'BONSAI-CHECK-END %s %d %d\n' "$nonce" 1 "$rc"
//!
//! printf 'BONSAI-DONE %s\n' "$nonce"
//! reboot -f
//! ```
//!
//! # Failures seen on the console
//!
//! A line containing any of [`PANIC_PATTERNS`] (anywhere in the line, since kernel messages
//! carry a timestamp prefix) fails the run, whatever the markers say.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;

pub const READY: &str = "BONSAI-READY";
pub const SERVICES_UP: &str = "BONSAI-SERVICES-UP";
pub const TIME: &str = "BONSAI-TIME";
pub const CHECK_BEGIN: &str = "BONSAI-CHECK-BEGIN";
pub const CHECK_END: &str = "BONSAI-CHECK-END";
pub const DONE: &str = "BONSAI-DONE";
pub const HOST: &str = "BONSAI-HOST";

/// The kernel parameter carrying the run's nonce.
pub const NONCE_PARAM: &str = "bonsai.nonce";
/// The kernel parameter asking the init to run the checks and power off.
pub const CHECK_PARAM: &str = "bonsai.check";

/// Console text that means the guest kernel died or is broken.
pub const PANIC_PATTERNS: &[&str] = &[
    "Kernel panic - not syncing",
    "end Kernel panic",
    "Attempted to kill init",
    "---[ end trace",
    "------------[ cut here ]------------",
    "Unable to mount root fs",
    "No working init found",
];

/// One marker, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    Ready {
        uptime: f64,
    },
    ServicesUp {
        uptime: f64,
    },
    Time {
        label: String,
        uptime: f64,
    },
    CheckBegin {
        index: usize,
    },
    CheckEnd {
        index: usize,
        exit: i32,
    },
    Done,
    /// The guest asks the host to act on the machine (QMP `command` with `arguments`), e.g. to
    /// plug in a disk while a check waits for it.
    Host {
        command: String,
        arguments: String,
    },
}

/// The parameters the host appends to the kernel command line for a check run.
pub fn kernel_params(nonce: &str) -> String {
    format!("{NONCE_PARAM}={nonce} {CHECK_PARAM}=1")
}

/// A fresh nonce: 16 lowercase hex characters.
///
/// Taken from `/dev/urandom`; where that cannot be read, from std's randomly keyed hasher
/// over the time and the process id. It only has to differ between runs, not be secret.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 8];
    let from_urandom = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    let value = if from_urandom {
        u64::from_le_bytes(bytes)
    } else {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        hasher.write_u128(now.as_nanos());
        hasher.write_u32(std::process::id());
        hasher.finish()
    };
    format!("{value:016x}")
}

/// Whether `nonce` can be put on a kernel command line and matched as one field.
pub fn is_valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A console line as the parser sees it: leading carriage returns and trailing whitespace
/// (including the `\r` of a `\r\n` ending) removed.
pub fn clean_line(raw: &str) -> &str {
    raw.trim_start_matches('\r').trim_end()
}

/// Whether a console line is a kernel log message (`[    2.345678] ...`, CONFIG_PRINTK_TIME):
/// while checks run the console shows warnings and worse, which may land between a check's
/// markers without being its output.
pub fn is_kernel_message(line: &str) -> bool {
    let Some(rest) = clean_line(line).strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let Some((secs, frac)) = stamp.trim_start().split_once('.') else {
        return false;
    };
    !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && frac.len() == 6
        && frac.bytes().all(|b| b.is_ascii_digit())
}

/// The marker on `line` for this run's `nonce`, if the line is one.
///
/// `line` may still carry its `\r` and line ending. Anything malformed, or with another
/// nonce, is ordinary console text and yields `None`.
pub fn parse_marker(line: &str, nonce: &str) -> Option<Marker> {
    let line = clean_line(line);
    if !line.starts_with("BONSAI-") {
        return None;
    }
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.get(1) != Some(&nonce) {
        return None;
    }
    let marker = match (fields[0], &fields[2..]) {
        (READY, [uptime]) => Marker::Ready {
            uptime: parse_uptime(uptime)?,
        },
        (SERVICES_UP, [uptime]) => Marker::ServicesUp {
            uptime: parse_uptime(uptime)?,
        },
        (TIME, [label, uptime]) if !label.is_empty() => Marker::Time {
            label: label.to_string(),
            uptime: parse_uptime(uptime)?,
        },
        (CHECK_BEGIN, [index]) => Marker::CheckBegin {
            index: index.parse().ok()?,
        },
        (CHECK_END, [index, exit]) => Marker::CheckEnd {
            index: index.parse().ok()?,
            exit: exit.parse().ok()?,
        },
        (DONE, []) => Marker::Done,
        (HOST, ["qmp", command]) if is_qmp_name(command) => Marker::Host {
            command: command.to_string(),
            arguments: "{}".to_string(),
        },
        (HOST, ["qmp", command, arguments]) if is_qmp_name(command) => Marker::Host {
            command: command.to_string(),
            arguments: arguments.to_string(),
        },
        _ => return None,
    };
    Some(marker)
}

/// A QMP command name: `device_add`, `query-pci`.
fn is_qmp_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn parse_uptime(field: &str) -> Option<f64> {
    field
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// The panic pattern `line` contains, if any.
pub fn panic_pattern(line: &str) -> Option<&'static str> {
    PANIC_PATTERNS.iter().copied().find(|p| line.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "0123456789abcdef";

    #[test]
    fn parses_every_marker() {
        assert_eq!(
            parse_marker("BONSAI-READY 0123456789abcdef 1.25", N),
            Some(Marker::Ready { uptime: 1.25 })
        );
        assert_eq!(
            parse_marker("BONSAI-SERVICES-UP 0123456789abcdef 2.50\n", N),
            Some(Marker::ServicesUp { uptime: 2.5 })
        );
        assert_eq!(
            parse_marker("BONSAI-TIME 0123456789abcdef mounts-done 0.75", N),
            Some(Marker::Time {
                label: "mounts-done".into(),
                uptime: 0.75
            })
        );
        assert_eq!(
            parse_marker("BONSAI-CHECK-BEGIN 0123456789abcdef 3", N),
            Some(Marker::CheckBegin { index: 3 })
        );
        assert_eq!(
            parse_marker("BONSAI-CHECK-END 0123456789abcdef 3 -1", N),
            Some(Marker::CheckEnd { index: 3, exit: -1 })
        );
        assert_eq!(
            parse_marker(
                "BONSAI-HOST 0123456789abcdef qmp device_del {\"id\":\"hp\"}\r",
                N
            ),
            Some(Marker::Host {
                command: "device_del".into(),
                arguments: "{\"id\":\"hp\"}".into()
            })
        );
        assert_eq!(
            parse_marker("BONSAI-HOST 0123456789abcdef qmp query-pci", N),
            Some(Marker::Host {
                command: "query-pci".into(),
                arguments: "{}".into()
            })
        );
        assert_eq!(
            parse_marker("BONSAI-DONE 0123456789abcdef", N),
            Some(Marker::Done)
        );
    }

    #[test]
    fn carriage_returns_are_tolerated() {
        assert_eq!(
            parse_marker("\r\rBONSAI-READY 0123456789abcdef 1.0\r\n", N),
            Some(Marker::Ready { uptime: 1.0 })
        );
        assert_eq!(
            parse_marker("\rBONSAI-DONE 0123456789abcdef\r", N),
            Some(Marker::Done)
        );
    }

    #[test]
    fn wrong_nonce_is_ignored() {
        assert_eq!(parse_marker("BONSAI-DONE fedcba9876543210", N), None);
        assert_eq!(parse_marker("BONSAI-READY 0123456789abcde 1.0", N), None);
        assert_eq!(parse_marker("BONSAI-DONE", N), None);
    }

    #[test]
    fn markers_must_start_the_line() {
        let echo = "[    0.000000] Command line: console=ttyS0 bonsai.nonce=0123456789abcdef \
                    bonsai.check=1";
        assert_eq!(parse_marker(echo, N), None);
        assert_eq!(
            parse_marker("Kernel command line: BONSAI-DONE 0123456789abcdef", N),
            None
        );
        assert_eq!(
            parse_marker("[    1.000000] BONSAI-DONE 0123456789abcdef", N),
            None
        );
        assert_eq!(parse_marker(" BONSAI-DONE 0123456789abcdef", N), None);
    }

    #[test]
    fn malformed_markers_are_text() {
        assert_eq!(parse_marker("BONSAI-READY 0123456789abcdef", N), None);
        assert_eq!(parse_marker("BONSAI-READY 0123456789abcdef soon", N), None);
        assert_eq!(parse_marker("BONSAI-READY 0123456789abcdef -1", N), None);
        assert_eq!(parse_marker("BONSAI-CHECK-END 0123456789abcdef 1", N), None);
        assert_eq!(parse_marker("BONSAI-DONE 0123456789abcdef extra", N), None);
        assert_eq!(parse_marker("BONSAI-BOGUS 0123456789abcdef", N), None);
        assert_eq!(parse_marker("BONSAI-HOST 0123456789abcdef", N), None);
        assert_eq!(parse_marker("BONSAI-HOST 0123456789abcdef qmp", N), None);
        assert_eq!(
            parse_marker("BONSAI-HOST 0123456789abcdef shell rm", N),
            None
        );
        assert_eq!(
            parse_marker("BONSAI-HOST 0123456789abcdef qmp Device;add {}", N),
            None
        );
    }

    #[test]
    fn panics_are_detected_anywhere_in_a_line() {
        let cases = [
            "[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
            "[    2.2] ---[ end Kernel panic ]---",
            "[    2.3] ---[ end trace 0000000000000000 ]---",
            "[    2.4] Run /init as init process",
        ];
        assert_eq!(panic_pattern(cases[0]), Some("Kernel panic - not syncing"));
        assert_eq!(panic_pattern(cases[1]), Some("end Kernel panic"));
        assert_eq!(panic_pattern(cases[2]), Some("---[ end trace"));
        // A WARN's first line, in case its end marker never reaches the console.
        assert_eq!(
            panic_pattern("[    3.0] ------------[ cut here ]------------"),
            Some("------------[ cut here ]------------")
        );
        assert_eq!(panic_pattern(cases[3]), None);
        assert_eq!(
            panic_pattern("No working init found.  Try passing init= option to kernel."),
            Some("No working init found")
        );
    }

    #[test]
    fn nonces_are_fresh_hex() {
        let a = new_nonce();
        let b = new_nonce();
        assert_eq!(a.len(), 16);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(is_valid_nonce(&a));
        assert_ne!(a, b);
        assert_eq!(
            kernel_params(&a),
            format!("bonsai.nonce={a} bonsai.check=1")
        );
        assert!(!is_valid_nonce(""));
        assert!(!is_valid_nonce("ab cd"));
    }
}
