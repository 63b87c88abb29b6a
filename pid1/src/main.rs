//! bonsai-init: bonsai's own PID 1. As PID 1 it mounts, prepares files, runs setup commands,
//! supervises services and shuts the machine down on a signal; as any other process it is a
//! small client that sends PID 1 those signals.
//!
//! `no_main`: std's own startup would open /dev/null onto closed fds 0-2 and abort the
//! process if it cannot, which as PID 1 (no /dev yet, no console node) is a kernel panic.
//! Our C `main` starts with the fds as the kernel left them and attaches the console itself.

#![cfg_attr(not(test), no_main)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::unreachable,
        clippy::todo
    )
)]

mod client;
mod config;
mod console;
mod devices;
mod mounts;
mod native;
mod service;
mod setup;
mod shutdown;
mod spawn;
mod supervisor;
mod update;

#[cfg(not(test))]
use std::ffi::{c_char, c_int, CStr};

use config::Config;
use console::log;
use supervisor::{Mode, Supervisor};

/// The process entry, called by the C runtime (see `no_main` above).
#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    // SAFETY: the C runtime passes argc valid NUL-terminated strings.
    let mut args = unsafe { collect_args(argc, argv) };
    let argv0 = if args.is_empty() {
        String::new()
    } else {
        args.remove(0)
    };
    // Installed as /bin/bonsai-update too: the same binary, the updater's commands.
    if argv0.rsplit('/').next() == Some("bonsai-update") {
        return update::main(&args);
    }
    entry(args)
}

/// Test builds get their main from the harness; this keeps `entry` reachable there.
#[cfg(test)]
fn main() {
    std::process::exit(entry(std::env::args().skip(1).collect()));
}

fn entry(args: Vec<String>) -> i32 {
    if nix::unistd::getpid().as_raw() == 1 {
        // The kernel passes unknown command-line words to init; they are ignored.
        pid1();
    }
    run_command(&args)
}

/// `argv` as strings (lossy), without std's runtime, which `no_main` skips.
///
/// # Safety
/// `argv` must hold `argc` pointers to NUL-terminated strings.
#[cfg(not(test))]
unsafe fn collect_args(argc: c_int, argv: *const *const c_char) -> Vec<String> {
    let count = usize::try_from(argc).unwrap_or(0);
    let mut args = Vec::with_capacity(count);
    for i in 0..count {
        let ptr = *argv.add(i);
        if ptr.is_null() {
            break;
        }
        args.push(CStr::from_ptr(ptr).to_string_lossy().into_owned());
    }
    args
}

/// Not PID 1. Exit codes: 0 done, 1 failed, 2 usage.
fn run_command(args: &[String]) -> i32 {
    if args.first().map(String::as_str) == Some("update") {
        return update::main(args.get(1..).unwrap_or_default());
    }
    // The device rules' handler, a setup step (rootfs renders `bonsai-init devices`).
    if args == ["devices"] {
        return devices::main();
    }
    match client::parse(args) {
        client::Command::Signal(sig) => client::signal_init(sig),
        client::Command::Version => client::version(),
        client::Command::TestMode(path) => test_mode(&path),
        client::Command::CheckConfig(path) => client::check_config(&path),
        client::Command::Usage => client::usage(),
    }
}

fn pid1() -> ! {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let loaded = Config::load(&config::config_path());
    let console = match &loaded {
        Ok(c) => c.console.clone(),
        Err(_) => "/dev/console".to_string(),
    };
    console::attach_console(&console);
    let _ = nix::unistd::setsid();
    log!(
        "starting (version {}) at {}",
        env!("CARGO_PKG_VERSION"),
        console::format_uptime(console::uptime())
    );
    let signals = supervisor::setup_signals();
    // Ctrl-Alt-Del then sends SIGINT, which reboots in order.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let mut sup = match loaded {
        Ok(config) => {
            mounts::mount_all(&config.mounts);
            // /dev may only now exist.
            console::attach_console(&config.console);
            boot_setup(&config);
            Supervisor::new(Mode::Pid1, &config, signals)
        }
        Err(e) => {
            // Mount first: without /dev the console may not be attached yet.
            mounts::mount_all(&mounts::emergency_mounts());
            console::attach_console(&console);
            log!("{e}");
            log!("emergency mode: no services; starting a shell on {console}");
            Supervisor::emergency(&console, signals)
        }
    };
    let halt = sup.run();
    shutdown::shutdown(&mut sup, halt);
    // Only test mode returns from shutdown; PID 1 must still never exit.
    loop {
        sup.wait_events(None);
    }
}

fn boot_setup(config: &Config) {
    setup::run_commands(&config.early);
    if let Some(name) = &config.hostname {
        setup::set_hostname(name);
    }
    setup::apply_tmpfiles(&config.tmpfiles);
    setup::run_commands(&config.setup);
}

/// The supervisor as an ordinary process: no console, mounts, hostname or reboot; orphans
/// are still reaped (child subreaper); ends after `after_start` has finished.
fn test_mode(path: &str) -> i32 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            log!("{e}");
            return 1;
        }
    };
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        log!("cannot become a child subreaper: {e}");
    }
    let signals = supervisor::setup_signals();
    setup::apply_tmpfiles(&config.tmpfiles);
    setup::run_commands(&config.setup);
    let mut sup = Supervisor::new(Mode::Test, &config, signals);
    let halt = sup.run();
    shutdown::shutdown(&mut sup, halt);
    0
}
