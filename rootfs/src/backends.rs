//! The init backends: each renders the same [`System`] into its own files.
//!
//! Shared by all four (so the result in the guest is the same whichever runs):
//! - `/etc/bonsai/setup`: mounts, hostname, tmpfiles, loopback, addresses and routes, in the
//!   order of [`System::steps`] and [`System::network`]; bonsai-init applies the same steps
//!   from `/etc/bonsai/init.json`, calling the same `ip` commands.
//! - `/etc/bonsai/svc/<name>/run`: waits for dependencies, marks the service started, drops
//!   privileges with busybox `start-stop-daemon -c`, clears the environment and execs the command.
//! - `/etc/bonsai/svc/<name>/finish`: restart policy and exponential backoff.
//! - `/etc/bonsai/svc/<name>/log`: the console prefixer or the log file writer.
//! - `/etc/bonsai/harness`: waits for every longrun, reports on the console, runs the checks.
//! - `/etc/bonsai/shutdown`: stops longruns in reverse order (stop command, then signal, then
//!   KILL after the timeout), then asks the backend to reboot, halt or power off. Under
//!   bonsai-init it only asks: PID 1 stops the services itself, so each stop hook runs once.
//!
//! The backends differ only in who supervises: runit's runsv, s6-supervise, a shell loop under
//! busybox init (which has no backoff or restart policy of its own), or bonsai-init.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::Result;
use crate::system::{Kind, Output, Restart, Service, Step, System};
use crate::tree::{Node, Source, Tree};

/// Which init runs as PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Busybox,
    Runit,
    S6,
    BonsaiInit,
}

impl Backend {
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "busybox" => Some(Backend::Busybox),
            "runit" => Some(Backend::Runit),
            "s6" => Some(Backend::S6),
            "bonsai-init" => Some(Backend::BonsaiInit),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Backend::Busybox => "busybox",
            Backend::Runit => "runit",
            Backend::S6 => "s6",
            Backend::BonsaiInit => "bonsai-init",
        }
    }
    /// The package attribute the backend needs besides busybox.
    pub fn package(self) -> Option<&'static str> {
        match self {
            Backend::Runit => Some("runit"),
            Backend::S6 => Some("s6"),
            _ => None,
        }
    }
}

/// Store paths (and the bonsai-init binary) a backend renders against.
#[derive(Debug, Clone)]
pub struct InitInputs {
    pub backend: Backend,
    /// Store path of busybox (the shell of every script).
    pub busybox: String,
    pub runit: Option<String>,
    pub s6: Option<String>,
    /// Host path of the static bonsai-init binary.
    pub bonsai_init: Option<PathBuf>,
    /// Deliberate faults, for the judge's negative tests only (empty in every real build).
    pub faults: Vec<crate::faults::Fault>,
}

fn file(text: impl Into<Vec<u8>>, mode: u32) -> Node {
    Node::file(Source::Bytes(text.into()), mode)
}

/// Quotes a word for sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn sh_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

const MOUNTS: &[(&str, &str, &str, &str)] = &[
    ("proc", "/proc", "proc", "nosuid,nodev,noexec"),
    ("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
    ("devtmpfs", "/dev", "devtmpfs", "nosuid,mode=0755"),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        "nosuid,noexec,gid=5,mode=620",
    ),
    ("tmpfs", "/dev/shm", "tmpfs", "nosuid,nodev,mode=1777"),
    ("tmpfs", "/run", "tmpfs", "nosuid,nodev,mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", "nosuid,nodev,mode=1777"),
];

/// Run-time folders every backend's scripts use.
const RUN_DIRS: &[&str] = &[
    "/run/bonsai/started",
    "/run/bonsai/up",
    "/run/bonsai/done",
    "/run/bonsai/delay",
    "/run/bonsai/down",
    "/run/bonsai/pid",
    "/run/log",
];

fn setup_script(sys: &System) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# bonsai boot-time setup (the same steps bonsai-init applies natively)\n",
    );
    for (src, target, fstype, opts) in MOUNTS {
        let _ = writeln!(
            s,
            "mkdir -p {target} && mount -t {fstype} -o {opts} {src} {target}"
        );
    }
    let _ = writeln!(s, "mkdir -p {}", RUN_DIRS.join(" "));
    if sys.modules.is_some() {
        s.push_str("/etc/bonsai/modules\n");
    }
    if sys.devices.is_some() {
        let _ = writeln!(s, "{}", crate::devices::DEVICES_SCRIPT);
    }
    if !sys.mounts.is_empty() {
        s.push_str("/etc/bonsai/mounts\n");
    }
    let _ = writeln!(s, "hostname {}", sh_quote(&sys.hostname));
    for (i, step) in sys.steps.iter().enumerate() {
        match step {
            Step::Dir {
                path,
                mode,
                uid,
                gid,
            } => {
                let p = sh_quote(path);
                let _ = writeln!(
                    s,
                    "mkdir -p {p} && chown {uid}:{gid} {p} && chmod {mode:o} {p}"
                );
            }
            Step::File {
                path,
                mode,
                uid,
                gid,
                ..
            } => {
                let p = sh_quote(path);
                let _ = writeln!(
                    s,
                    "mkdir -p \"$(dirname {p})\" && cp /etc/bonsai/setup-files/{i} {p} && chown {uid}:{gid} {p} && chmod {mode:o} {p}"
                );
            }
            Step::Symlink { path, target } => {
                let p = sh_quote(path);
                let _ = writeln!(
                    s,
                    "mkdir -p \"$(dirname {p})\" && ln -sfn {} {p}",
                    sh_quote(target)
                );
            }
        }
    }
    s.push_str("ip link set lo up\n");
    for cmd in &sys.network {
        let _ = writeln!(
            s,
            "{} >/dev/null || echo \"bonsai: {} failed\" >/dev/console",
            sh_words(cmd),
            sh_words(cmd).replace('"', "")
        );
    }
    s.push_str("/etc/bonsai/slot\nexit 0\n");
    s
}

fn run_script(svc: &Service, sys: &System) -> String {
    let mut s = format!(
        "#!/bin/sh\n# service {} ({})\nexec 2>&1\n",
        svc.name,
        kind_name(svc.kind)
    );
    for dep in &svc.after {
        let dep_svc = sys.services.iter().find(|d| &d.name == dep);
        match dep_svc.map(|d| d.kind) {
            Some(Kind::Oneshot) => {
                let _ = writeln!(
                    s,
                    "[ -e /run/bonsai/done/{dep} ] || {{ echo \"{}: not starting: oneshot {dep} did not succeed\"; exit 1; }}",
                    svc.name
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "while [ ! -e /run/bonsai/up/{dep} ]; do usleep 10000; done"
                );
            }
        }
    }
    // The start time goes to the console (boot charts read it, like bonsai-init's own line).
    let _ = writeln!(
        s,
        "read -r up _ </proc/uptime; echo \"bonsai: started {n} at ${{up}}s\" >/dev/console",
        n = svc.name
    );
    if svc.kind == Kind::Longrun {
        let _ = writeln!(
            s,
            "echo \"${{up%.*}}\" >/run/bonsai/started/{n}; : >/run/bonsai/up/{n}",
            n = svc.name
        );
    }
    let _ = writeln!(s, "cd {} || exit 1", sh_quote(&svc.working_directory));
    match sys.users.iter().find(|u| u.uid == svc.uid && svc.uid != 0) {
        // busybox start-stop-daemon -c (in every busybox build, unlike su, which Debian's
        // dynamic one lacks): the user's uid, primary gid and supplementary groups, then an
        // exec in the same process (no fork, so the supervisor's pid stays the service's).
        Some(user) => {
            let _ = writeln!(
                s,
                "exec start-stop-daemon -S -c {} -x /etc/bonsai/svc/{}/exec",
                user.name, svc.name
            );
        }
        None => {
            let _ = writeln!(s, "exec /etc/bonsai/svc/{}/exec", svc.name);
        }
    }
    s
}

/// The last step of a service's start: a clean environment, then the command.
fn exec_script(svc: &Service) -> String {
    let mut exec = String::from("exec env -i PATH=/bin");
    for (k, v) in &svc.environment {
        let _ = write!(exec, " {}", sh_quote(&format!("{k}={v}")));
    }
    format!("#!/bin/sh\n{exec} {}\n", sh_words(&svc.argv))
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Longrun => "longrun",
        Kind::Oneshot => "oneshot",
    }
}

/// The log side of a service: reads its output on stdin.
fn log_script(svc: &Service, backend: Backend) -> String {
    match svc.output {
        Output::Console => format!(
            "#!/bin/sh\n# prefixes {n}'s output on the console\nwhile IFS= read -r line; do printf '[{n}] %s\\n' \"$line\"; done >/dev/console\n",
            n = svc.name
        ),
        Output::Log => {
            let dir = format!("/run/log/{}", svc.name);
            let exec = match backend {
                Backend::Runit => format!("exec svlogd {dir}"),
                Backend::S6 => format!("exec s6-log {dir}"),
                // busybox has no rotating logger: append.
                _ => format!("exec cat >>{dir}/current"),
            };
            format!("#!/bin/sh\n# writes {n}'s output to {dir}/current\nmkdir -p {dir}\n{exec}\n", n = svc.name)
        }
    }
}

/// Called with the exit code (and signal) when the service's process ended.
fn finish_script(svc: &Service, backend: Backend) -> String {
    let n = &svc.name;
    let down = match backend {
        Backend::Runit => {
            format!("sv down /etc/service/{n} >/dev/null 2>&1; : >/run/bonsai/down/{n}")
        }
        Backend::S6 => format!("s6-svc -d /etc/s6/scan/{n}; : >/run/bonsai/down/{n}"),
        _ => format!(": >/run/bonsai/down/{n}"),
    };
    let stay_down = match svc.restart {
        Restart::Always => String::new(),
        Restart::OnFailure => format!("if [ \"$code\" = 0 ]; then {down}; exit 0; fi\n"),
        Restart::Never => format!("{down}; exit 0\n"),
    };
    format!(
        r#"#!/bin/sh
# {n}: restart policy {policy}, backoff {init} ms doubling to {max} ms (reset after 10 s up)
rm -f /run/bonsai/up/{n}
code=${{1:-1}}
[ -e /run/bonsai/stopping ] && exit 0
echo "[{n}] exited (code $code)" >/dev/console
{stay_down}read -r now _ </proc/uptime; now=${{now%.*}}
started=$(cat /run/bonsai/started/{n} 2>/dev/null || echo 0)
delay=$(cat /run/bonsai/delay/{n} 2>/dev/null || echo {init})
[ $((now - started)) -ge 10 ] && delay={init}
usleep $((delay * 1000))
next=$((delay * 2)); [ $next -gt {max} ] && next={max}
echo $next >/run/bonsai/delay/{n}
exit 0
"#,
        policy = svc.restart.as_str(),
        init = svc.restart_delay_ms,
        max = svc.restart_max_delay_ms,
    )
}

/// Runs the oneshots in dependency order (shell backends' stage 1).
fn oneshots_script(sys: &System) -> String {
    let mut s = String::from("#!/bin/sh\n# oneshots, dependencies first\nset -o pipefail\n");
    for svc in sys.oneshots() {
        let n = &svc.name;
        let _ = writeln!(
            s,
            "if /etc/bonsai/svc/{n}/run | /etc/bonsai/svc/{n}/log; then : >/run/bonsai/done/{n}; else echo \"bonsai: oneshot {n} failed\" >/dev/console; fi"
        );
    }
    s
}

fn harness_script(sys: &System, wait: bool) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# reports readiness on the console and, with bonsai.check=1, runs the checks and reboots\nexport PATH=/bin HOME=/root\n",
    );
    if wait {
        for svc in sys.longruns() {
            let _ = writeln!(
                s,
                "while [ ! -e /run/bonsai/started/{} ]; do usleep 10000; done",
                svc.name
            );
        }
    }
    s.push_str(
        r#"nonce=
check=
for w in $(cat /proc/cmdline); do
	case "$w" in
	bonsai.nonce=*) nonce=${w#bonsai.nonce=} ;;
	bonsai.check=1) check=1 ;;
	esac
done
# Services up is stamped by the kernel, on the clock of its "Run /init" line: bonsai-init
# logs the moment itself (and notes /run/bonsai/services-up); under the other inits it is
# now, when this harness starts after every service.
[ -e /run/bonsai/services-up ] || echo '<7>bonsai: services up' >/dev/kmsg 2>/dev/null
read -r up _ </proc/uptime
printf 'BONSAI-READY %s %s\n' "${nonce:-none}" "$up" >/dev/console
services_up=$(dmesg 2>/dev/null | sed -n 's/^\[ *\([0-9][0-9.]*\)\] bonsai: services up$/\1/p' | tail -n 1)
if [ -z "$services_up" ]; then
	# A kernel without a log: PID 1's note (uptime, to the millisecond), else now.
	services_up=$up
	[ -r /run/bonsai/services-up ] && read -r services_up </run/bonsai/services-up
fi
printf 'BONSAI-SERVICES-UP %s %s\n' "${nonce:-none}" "$services_up" >/dev/console
# A boot from a disk slot: health checks, then blessing (or a reboot, for a failed trial).
/etc/bonsai/health "${nonce:-none}"
# bonsai.update=<file|http://...>: install that bundle (a file of the data partition, or a URL)
# now, once the boot is healthy (cargo xtask update-test; a lab or a factory line). On success
# it reboots.
update=$(sed -n 's/.*bonsai[.]update=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$update" ] && [ "$update" != none ] && [ -x /bin/bonsai-update ]; then
	data=/run/bonsai/data
	case "$update" in
	http://*)
		# QEMU's user network, where the guest is 10.0.2.15 (a device uses its profile's network)
		ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
		src=$update
		;;
	*)
		mkdir -p "$data"
		for u in /sys/class/block/*/uevent; do
			grep -qx 'PARTNAME=data' "$u" 2>/dev/null || continue
			mount -t vfat -o ro "/dev/$(sed -n 's/^DEVNAME=//p' "$u")" "$data"
			break
		done
		src=$data/$update
		;;
	esac
	/bin/bonsai-update install "$src" >/dev/console 2>&1
	umount "$data" 2>/dev/null
fi
# bonsai.hold=1: stay up without a console shell (the host logs in over SSH).
grep -q 'bonsai.hold=1' /proc/cmdline && exec sleep 2147483647
if [ -n "$check" ]; then
	# Warnings and worse (WARN traces, oopses, the OOM killer) still reach the console while
	# the checks run; notices and info stay quiet. The check runner prints each check's
	# output in one write, so kernel lines land between checks, not inside their output.
	echo 5 >/proc/sys/kernel/printk
	/etc/bonsai/run-checks "$nonce" >/dev/console 2>&1
	printf 'BONSAI-DONE %s\n' "$nonce" >/dev/console
	exec /etc/bonsai/shutdown reboot
fi
echo "bonsai: $(hostname) is up ($(cat /etc/bonsai/init-name)); leave the shell to power off" >/dev/console
setsid cttyhack sh -l
exec /etc/bonsai/shutdown poweroff
"#,
    );
    s
}

/// The GPT name of the EFI system partition that holds the slots' boot entries (the `disk`
/// crate's `ESP_NAME`): the health step finds it through the kernel's `PARTNAME`.
pub const ESP_PARTNAME: &str = "esp";

/// `/etc/bonsai/slot`, the last setup step: a boot from a disk slot (`bonsai.slot=` on the
/// kernel command line) notes its slot in `/run/bonsai/slot` and starts the watchdog petter.
/// The petter pets every second until the trial deadline and after it only once the health
/// step has finished (`/run/bonsai/healthy`): a boot that hangs before then is reset by the
/// watchdog, so the boot loader's counter still runs down.
fn slot_script(sys: &System) -> String {
    let deadline_s = sys.health.trial_deadline_ms.div_ceil(1000);
    format!(
        r#"#!/bin/sh
# bonsai: the slot of a boot from disk, and its watchdog (the last setup step)
export PATH=/bin
slot=
for w in $(cat /proc/cmdline); do
	case "$w" in
	bonsai.slot=*) slot=${{w#bonsai.slot=}} ;;
	esac
done
[ -n "$slot" ] || exit 0
echo "$slot" >/run/bonsai/slot
if grep -qw bonsai.watchdog=0 /proc/cmdline; then
	echo "bonsai: slot $slot: the watchdog is off (bonsai.watchdog=0), so a hang is not caught" >/dev/console
	exit 0
fi
if [ ! -c /dev/watchdog ]; then
	echo "bonsai: slot $slot: no /dev/watchdog, so a hang is not caught" >/dev/console
	exit 0
fi
setsid sh -c '
deadline=$1
exec 3>/dev/watchdog || exit 0
trap "printf V >&3; exit 0" TERM INT
stopped=
while :; do
	read -r up _ </proc/uptime
	if [ -e /run/bonsai/healthy ] || [ "${{up%.*}}" -lt "$deadline" ]; then
		printf . >&3
	elif [ -z "$stopped" ]; then
		stopped=1
		echo "bonsai: not healthy at the trial deadline ($deadline s after the kernel started): the watchdog resets the machine" >/dev/console
	fi
	sleep 1
done' bonsai-watchdog {deadline_s} </dev/null >/dev/null 2>&1 &
exit 0
"#
    )
}

/// The size of the U-Boot environment the Pi's health step rewrites (the `disk` crate's
/// `uboot::ENV_SIZE`, Debian's `rpi_3` build).
pub const UBOOT_ENV_SIZE: usize = 0x4000;

/// `/etc/bonsai/health`, run by the harness once every service is up, on a boot from a disk
/// slot only. It prints what it finds as raw lines for the host (`BONSAI-ENTRY`, `BONSAI-SLOT`,
/// `BONSAI-HEALTH`, `BONSAI-BLESSED`, `BONSAI-HEALTH-REBOOT`, `BONSAI-NO-GOOD-SLOT`), and:
/// - runs each `[health.checks]` command until it passes or its deadline (from now) passes;
/// - all passed: blesses the boot with the one step its boot loader understands: systemd-boot's
///   entry `bonsai-<slot>+L-D.conf` renamed `bonsai-<slot>.conf` (the ESP, found by its GPT
///   name), or U-Boot's environment written anew with the slot's tries reset (the boot
///   partition `bonsai.boot=` names, holding `uboot.env`);
/// - one failed on a trial: reboots at once (a try used up); on the last try of the last slot
///   left (nothing else good), stays up unblessed instead of looping;
/// - says when the slot runs because a newer one used up its tries (a rollback).
fn health_script(sys: &System, busybox: &str) -> String {
    let env_data = UBOOT_ENV_SIZE - 4;
    let mut s = format!(
        r#"#!/bin/sh
# bonsai: health checks of a boot from a disk slot, then blessing or a reboot
export PATH=/bin
nonce=${{1:-none}}
[ -r /run/bonsai/slot ] || exit 0
read -r slot </run/bonsai/slot
# uptime in milliseconds
ms() {{ read -r u _ </proc/uptime; u=${{u%.*}}${{u#*.}}0; u=${{u#${{u%%[1-9]*}}}}; echo "${{u:-0}}"; }}
esp=/run/bonsai/esp
dev=
mode=efi
fallback=
for u in /sys/class/block/*/uevent; do
	grep -qx 'PARTNAME={ESP_PARTNAME}' "$u" 2>/dev/null || continue
	dev=/dev/$(sed -n 's/^DEVNAME=//p' "$u")
	break
done
for w in $(cat /proc/cmdline); do
	case "$w" in
	bonsai.boot=*) [ -n "$dev" ] || {{ dev=${{w#bonsai.boot=}}; mode=uboot; }} ;;
	bonsai.fallback=1) fallback=1 ;;
	esac
done
mkdir -p "$esp"
if [ -z "$dev" ] || ! mount -t vfat "$dev" "$esp"; then
	echo "bonsai: slot $slot: cannot mount the boot partition (${{dev:-none named {ESP_PARTNAME}, no bonsai.boot=}}): nothing to bless" >/dev/console
	: >/run/bonsai/healthy
	exit 0
fi
own=
ownv=
other_good=
if [ "$mode" = efi ]; then
	entries=$esp/loader/entries
	for f in "$entries"/bonsai-*.conf; do
		[ -e "$f" ] || continue
		n=${{f##*/}}
		v=$(sed -n 's/^version //p' "$f")
		printf 'BONSAI-ENTRY %s %s %s\n' "$nonce" "$n" "$v" >/dev/console
		case "$n" in
		"bonsai-$slot.conf" | "bonsai-$slot+"*) own=$n ownv=$v ;;
		esac
	done
	case "$own" in
	"") state=missing ;;
	*+0-*.conf | *+0.conf) state=bad ;;
	*+*) state=trial ;;
	*) state=blessed ;;
	esac
	gen=${{ownv%%-*}}
	case "$gen" in '' | *[!0-9]*) gen=0 ;; esac
	for f in "$entries"/bonsai-*.conf; do
		[ -e "$f" ] || continue
		n=${{f##*/}}
		[ "$n" = "$own" ] && continue
		case "$n" in
		*+0-*.conf | *+0.conf)
			v=$(sed -n 's/^version //p' "$f")
			g=${{v%%-*}}
			case "$g" in '' | *[!0-9]*) continue ;; esac
			o=${{n#bonsai-}}
			[ "$g" -gt "$gen" ] && echo "bonsai: rolled back: slot ${{o%%+*}} (version ${{v#*-}}) used up its boot tries; running slot $slot (version ${{ownv#*-}})" >/dev/console
			;;
		*) other_good=$n ;;
		esac
	done
	bless() {{ mv "$entries/$own" "$entries/bonsai-$slot.conf" && sync; }}
	blessed_as=bonsai-$slot.conf
else
	# U-Boot's environment: CRC-32, then NUL-ended name=value pairs (RAUC's BOOT_ORDER and
	# BOOT_<X>_LEFT, which U-Boot counted down before this boot).
	txt=/run/bonsai/uboot.env.txt
	tail -c +5 "$esp/uboot.env" | tr '\000' '\n' | sed '/^$/,$d' >"$txt"
	get() {{ sed -n "s/^$1=//p" "$txt"; }}
	up=$(echo "$slot" | tr a-z A-Z)
	order=$(get BOOT_ORDER)
	tries=$(get bonsai_tries)
	own="BOOT_${{up}}_LEFT=$(get "BOOT_${{up}}_LEFT")"
	ownv=0-$(get "bonsai_${{slot}}_version")
	printf 'BONSAI-UBOOT-ENV %s BOOT_ORDER=%s BOOT_A_LEFT=%s BOOT_B_LEFT=%s\n' "$nonce" "$(echo "$order" | tr ' ' ,)" "$(get BOOT_A_LEFT)" "$(get BOOT_B_LEFT)" >/dev/console
	state=trial
	[ -n "$fallback" ] && state=bad
	for o in $order; do
		[ "$o" = "$up" ] && continue
		left=$(get "BOOT_${{o}}_LEFT")
		[ "${{left:-0}}" -gt 0 ] && other_good=$o
	done
	first=${{order%% *}}
	if [ "$first" != "$up" ] && [ "$(get "BOOT_${{first}}_LEFT")" = 0 ]; then
		f=$(echo "$first" | tr A-Z a-z)
		echo "bonsai: rolled back: slot $f (version $(get "bonsai_${{f}}_version")) used up its boot tries; running slot $slot (version ${{ownv#*-}})" >/dev/console
	fi
	bless() {{
		n=/run/bonsai/uboot.env.new
		sed "s/^BOOT_${{up}}_LEFT=.*/BOOT_${{up}}_LEFT=${{tries:-3}}/" "$txt" | tr '\n' '\000' >"$n.data"
		printf '\000' >>"$n.data"
		head -c $(({env_data} - $(wc -c <"$n.data"))) /dev/zero >>"$n.data"
		# gzip's trailer holds the CRC-32 of its input, little-endian, as U-Boot stores it.
		gzip -c <"$n.data" | tail -c 8 | head -c 4 >"$n"
		cat "$n.data" >>"$n"
		cp "$n" "$esp/uboot.env.new" && sync && mv "$esp/uboot.env.new" "$esp/uboot.env" && sync
	}}
	blessed_as="BOOT_${{up}}_LEFT=${{tries:-3}}"
fi
printf 'BONSAI-SLOT %s %s %s %s\n' "$nonce" "$slot" "${{own:-none}}" "$state" >/dev/console
# health checks: each deadline counts from here, when every service is up
t0=$(ms)
failed=
health() {{
	name=$1
	deadline=$2
	shift 2
	n=0
	while :; do
		n=$((n + 1))
		left=$((deadline - ($(ms) - t0)))
		[ "$left" -lt 1 ] && left=1
		if timeout $(((left + 999) / 1000)) "$@" >"/run/bonsai/health.$name" 2>&1; then
			printf 'BONSAI-HEALTH %s %s pass %s %s\n' "$nonce" "$name" "$n" "$(($(ms) - t0))" >/dev/console
			return 0
		fi
		if [ $(($(ms) - t0)) -ge "$deadline" ]; then
			printf 'BONSAI-HEALTH %s %s fail %s %s\n' "$nonce" "$name" "$n" "$(($(ms) - t0))" >/dev/console
			echo "bonsai: health check $name failed $n times in $deadline ms: $(tail -n 1 "/run/bonsai/health.$name")" >/dev/console
			return 1
		fi
		usleep 200000
	done
}}
"#
    );
    for c in &sys.health.checks {
        let _ = writeln!(
            s,
            "health {} {} {} || failed=\"$failed {}\"",
            c.name,
            c.deadline_ms,
            sh_words(&c.argv),
            c.name
        );
    }
    let _ = write!(
        s,
        r#"# the verdict
if [ -z "$failed" ]; then
	case "$state" in
	trial | bad)
		if bless; then
			printf 'BONSAI-BLESSED %s %s %s\n' "$nonce" "$own" "$blessed_as" >/dev/console
			echo "bonsai: slot $slot (version ${{ownv#*-}}) is healthy: blessed" >/dev/console
		else
			echo "bonsai: slot $slot: blessing $own failed" >/dev/console
		fi
		;;
	*) echo "bonsai: slot $slot (version ${{ownv#*-}}) is healthy" >/dev/console ;;
	esac
elif [ "$state" = trial ] || {{ [ "$state" = bad ] && [ -n "$other_good" ]; }}; then
	printf 'BONSAI-HEALTH-REBOOT %s %s\n' "$nonce" "$own" >/dev/console
	echo "bonsai: slot $slot failed its health checks ($failed ): rebooting at once" >/dev/console
	umount "$esp"
	exec {busybox}/bin/busybox reboot -f
elif [ "$state" = bad ]; then
	printf 'BONSAI-NO-GOOD-SLOT %s %s\n' "$nonce" "$slot" >/dev/console
	echo "bonsai: no good slot: slot $slot failed its health checks on its last try and no other slot is left; staying up on it, unblessed" >/dev/console
else
	echo "bonsai: slot $slot failed its health checks ($failed ) but is not on trial: staying up" >/dev/console
fi
umount "$esp"
: >/run/bonsai/healthy
exit 0
"#
    );
    s
}

/// What bonsai-init runs first of its setup, as the shell backends' setup script does: the
/// modules step, then the mounts.
fn early_steps(sys: &System) -> Vec<Vec<String>> {
    let mut v = Vec::new();
    if sys.modules.is_some() {
        v.push(vec![MODULES_SCRIPT.to_string()]);
    }
    if sys.devices.is_some() {
        v.push(vec!["/bin/bonsai-init".to_string(), "devices".to_string()]);
    }
    if !sys.mounts.is_empty() {
        v.push(vec!["/etc/bonsai/mounts".to_string()]);
    }
    v
}

const MODULES_SCRIPT: &str = "/etc/bonsai/modules";

/// `/etc/bonsai/modules`: `[kernel] load` in order, then coldplug: every modalias a device
/// under /sys shows, through modprobe's `modules.alias` (a modalias no kept module matches is
/// left alone). Each module loaded is said on the console.
fn modules_script(m: &crate::system::Modules) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# [kernel] modules: the load list, then coldplug by modalias (every backend runs this)\nexport PATH=/bin\n",
    );
    for name in &m.load {
        let _ = writeln!(
            s,
            "if modprobe {name}; then echo \"bonsai: module {name} loaded\" >/dev/console; else echo \"bonsai: module {name}: modprobe failed\" >/dev/console; fi"
        );
    }
    s.push_str(
        "for a in $(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u); do\n\tbefore=$(cut -d' ' -f1 /proc/modules)\n\tmodprobe -q \"$a\" 2>/dev/null || continue\n\tfor name in $(cut -d' ' -f1 /proc/modules); do\n\t\tcase \" $(echo $before) \" in *\" $name \"*) ;; *) echo \"bonsai: module $name loaded for $a\" >/dev/console ;; esac\n\tdone\ndone\n",
    );
    s
}

/// `/etc/bonsai/mounts`: `[[setup.mounts]]` in order, run by every backend before the other
/// setup steps. Each waits for its device, makes the filesystem when the
/// device is empty and `make-fs` is set, and mounts it; a failure is said on the console and
/// boot goes on (a data partition that fails must not leave the device unbootable).
fn mounts_script(sys: &System) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# [[setup.mounts]], in order (every backend runs this script)\nexport PATH=/bin\n",
    );
    if sys.mounts.iter().any(|m| m.device.starts_with("LABEL=")) {
        // The same label reader as the device rules' {label} (ext2/3/4, FAT).
        s.push_str(crate::devices::FSLABEL);
        s.push_str("bylabel() {\n\tfor b in /sys/class/block/*; do\n\t\td=/dev/${b##*/}\n\t\t[ -b \"$d\" ] && [ \"$(fslabel \"$d\")\" = \"$1\" ] && { echo \"$d\"; return 0; }\n\tdone\n\treturn 1\n}\n");
    }
    for m in &sys.mounts {
        let target = sh_quote(&m.target);
        let shown = &m.device;
        let find = match m.device.strip_prefix("LABEL=") {
            Some(l) => format!("dev=$(bylabel {})", sh_quote(l)),
            None => format!("[ -b {d} ] && dev={d}", d = sh_quote(&m.device)),
        };
        let tries = m.timeout_ms.div_ceil(50);
        let _ = writeln!(
            s,
            "dev=; i=0\nwhile :; do {find}; [ -n \"$dev\" ] && break; [ $i -ge {tries} ] && break; usleep 50000; i=$((i + 1)); done"
        );
        let _ = writeln!(
            s,
            "if [ -z \"$dev\" ]; then echo \"bonsai: mount {shown} on {t}: no such device after {ms} ms\" >/dev/console\nelse",
            t = m.target,
            ms = m.timeout_ms
        );
        if let Some(mkfs) = &m.make_fs {
            // With device rules, the new filesystem's label is news to them (by-label links):
            // a change event, handled before the mount goes on.
            let relabel = if sys.devices.is_some() {
                format!(
                    "\n\t\techo change >\"/sys/class/block/${{dev##*/}}/uevent\" && {}",
                    crate::devices::SETTLE_SCRIPT
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "\tif [ -z \"$(head -c 65536 \"$dev\" | tr -d '\\000' | head -c 1)\" ]; then\n\t\techo \"bonsai: mount: $dev is empty, making {fs} on it\" >/dev/console\n\t\t{} \"$dev\" >/dev/null 2>&1 || echo \"bonsai: mount: making {fs} on $dev failed\" >/dev/console{relabel}\n\tfi",
                sh_words(mkfs),
                fs = m.fstype
            );
        }
        let _ = writeln!(
            s,
            "\tmkdir -p {target}\n\tif mount -t {} -o {} \"$dev\" {target}; then echo \"bonsai: mounted $dev on {t}\" >/dev/console; else echo \"bonsai: mount $dev on {t} failed\" >/dev/console; fi\nfi",
            sh_quote(&m.fstype),
            sh_quote(&m.options),
            t = m.target
        );
    }
    s
}

#[cfg(test)]
pub(crate) fn tests_mounts_script(sys: &System) -> String {
    mounts_script(sys)
}

/// `/etc/bonsai/unmounts`: the shell backends' last step before the kernel call, after every
/// service has stopped: `[[setup.mounts]]` in reverse order, read-only when busy.
fn unmounts_script(sys: &System) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# [[setup.mounts]] in reverse order, at shutdown\nexport PATH=/bin\n",
    );
    for m in sys.mounts.iter().rev() {
        let t = sh_quote(&m.target);
        let _ = writeln!(
            s,
            "if grep -q \" {p} \" /proc/mounts; then\n\tif umount {t}; then echo \"bonsai: unmounted {p}\"; elif mount -o remount,ro {t}; then echo \"bonsai: {p} busy, remounted read-only\"; else echo \"bonsai: unmounting {p} failed\"; fi >/dev/console\nfi",
            p = m.target
        );
    }
    s
}

/// `/etc/bonsai/dhcp <interface>`: the first lease for `[[setup.interfaces]] dhcp = true`.
/// Setup waits for it up to 10 s (5 discovers, 2 s apart); udhcpc then stays in the background,
/// renewing the lease, or, when none came, still asking (once a minute).
const DHCP: &str = r#"#!/bin/sh
# DHCP (IPv4) on one interface, the same on every backend: busybox udhcpc and /etc/bonsai/udhcpc
export PATH=/bin
iface=$1
exec udhcpc -i "$iface" -s /etc/bonsai/udhcpc -p "/run/bonsai/dhcp-$iface.pid" -t 5 -T 2 -A 60 -b >/dev/null 2>&1
"#;

/// udhcpc's event script: the lease's address (replacing the previous lease's only; static
/// addresses stay), the default route through the first router, and /etc/resolv.conf.
const UDHCPC: &str = r#"#!/bin/sh
# udhcpc events for bonsai's DHCP: $interface $ip $mask $router $dns $domain
export PATH=/bin
lease=/run/bonsai/dhcp-$interface.lease
event=$1
gw=${router%% *}
case "$event" in
deconfig)
	[ -s "$lease" ] && ip -4 addr del "$(cat "$lease")" dev "$interface" 2>/dev/null
	rm -f "$lease"
	ip link set "$interface" up
	;;
bound|renew)
	new="$ip/${mask:-32}"
	old=$(cat "$lease" 2>/dev/null)
	if [ "$old" != "$new" ]; then
		[ -n "$old" ] && ip -4 addr del "$old" dev "$interface" 2>/dev/null
		ip -4 addr add "$new" dev "$interface"
		echo "$new" >"$lease"
	fi
	[ -n "$gw" ] && ip -4 route replace default via "$gw" dev "$interface"
	{
		[ -n "$domain" ] && echo "search $domain"
		for d in $dns; do echo "nameserver $d"; done
	} >/etc/resolv.conf.dhcp && mv /etc/resolv.conf.dhcp /etc/resolv.conf
	rm -f "/run/bonsai/dhcp-$interface.nolease"
	echo "bonsai: dhcp: $interface $event $new router ${gw:-none} dns ${dns:-none}" >/dev/console
	;;
leasefail|nak)
	if [ ! -e "/run/bonsai/dhcp-$interface.nolease" ]; then
		: >"/run/bonsai/dhcp-$interface.nolease"
		echo "bonsai: dhcp: no lease on $interface; booting on, still asking in the background" >/dev/console
	fi
	;;
esac
exit 0
"#;

/// Stops longruns in reverse order, then asks PID 1 to end the system.
fn shutdown_script(sys: &System, backend: Backend) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# bonsai shutdown: stop longruns in reverse dependency order, then reboot/poweroff/halt\nexport PATH=/bin\naction=${1:-poweroff}\n[ -e /run/bonsai/stopping ] && exit 0\n: >/run/bonsai/stopping\necho \"$action\" >/run/bonsai/action\n",
    );
    // bonsai-init stops its services itself (stop hooks, signals, timeouts, newest first):
    // stopping them here too would run every stop hook twice.
    let longruns: Vec<&Service> = match backend {
        Backend::BonsaiInit => Vec::new(),
        _ => sys.longruns().collect(),
    };
    for svc in longruns.iter().rev() {
        let n = &svc.name;
        if let Some(cmd) = &svc.stop_command {
            let _ = writeln!(s, "{} </dev/null >/dev/console 2>&1", sh_words(cmd));
        }
        let secs = svc.stop_timeout_ms.div_ceil(1000).max(1);
        let (sig, _) = &svc.stop_signal;
        let stop = match backend {
            Backend::Runit => format!("sv -w {secs} down /etc/service/{n} >/dev/null 2>&1 || sv kill /etc/service/{n} >/dev/null 2>&1"),
            Backend::S6 => format!(
                "s6-svc -wD -T {} -d /etc/s6/scan/{n} 2>/dev/null || s6-svc -k /etc/s6/scan/{n}",
                svc.stop_timeout_ms.max(1)
            ),
            _ => format!(
                ": >/run/bonsai/down/{n}; p=$(cat /run/bonsai/pid/{n} 2>/dev/null); if [ -n \"$p\" ]; then kill -{sig} \"$p\" 2>/dev/null; i=0; while kill -0 \"$p\" 2>/dev/null && [ $i -lt {t} ]; do usleep 10000; i=$((i + 1)); done; kill -KILL \"$p\" 2>/dev/null; fi",
                t = svc.stop_timeout_ms / 10
            ),
        };
        let _ = writeln!(s, "{stop}\necho \"bonsai: stopped {n}\" >/dev/console");
    }
    // bonsai-init unmounts natively, after it has stopped everything.
    if !sys.mounts.is_empty() && backend != Backend::BonsaiInit {
        s.push_str("/etc/bonsai/unmounts\n");
    }
    s.push_str("sync\n");
    s.push_str(match backend {
        Backend::Runit => {
            "case \"$action\" in reboot) exec runit-init 6 ;; *) exec runit-init 0 ;; esac\n"
        }
        Backend::S6 => "exec s6-svscanctl -t /etc/s6/scan\n",
        // busybox init's own shutdown calls this script again (a no-op), then kills and reboots.
        Backend::Busybox => "case \"$action\" in reboot) exec busybox reboot ;; halt) exec busybox halt ;; *) exec busybox poweroff ;; esac\n",
        Backend::BonsaiInit => "exec bonsai-init \"$action\"\n",
    });
    s
}

/// The final step after s6-svscan or runit have stopped everything. The applets are called
/// through `busybox`: /bin/poweroff is bonsai's ordered-stop wrapper, which a busybox without
/// FEATURE_PREFER_APPLETS (Nixpkgs' and Debian's dynamic one) would find on PATH instead.
const FINAL: &str = r#"#!/bin/sh
# the last thing before the kernel call
export PATH=/bin
sync
case "$(cat /run/bonsai/action 2>/dev/null)" in
halt) exec busybox halt -f ;;
poweroff) exec busybox poweroff -f ;;
*) exec busybox reboot -f ;;
esac
"#;

/// busybox init has no supervisor with policies: one shell loop per longrun.
fn supervise_script(svc: &Service) -> String {
    let n = &svc.name;
    format!(
        r#"#!/bin/sh
# supervises {n} under busybox init: run, log, finish (policy and backoff), again
export PATH=/bin
mkfifo /run/bonsai/pid/{n}.fifo 2>/dev/null
/etc/bonsai/svc/{n}/log </run/bonsai/pid/{n}.fifo &
exec 3>/run/bonsai/pid/{n}.fifo
while [ ! -e /run/bonsai/down/{n} ] && [ ! -e /run/bonsai/stopping ]; do
	/etc/bonsai/svc/{n}/run >&3 2>&3 &
	echo $! >/run/bonsai/pid/{n}
	wait $!
	code=$?
	[ -e /run/bonsai/stopping ] && break
	/etc/bonsai/svc/{n}/finish "$code"
done
"#
    )
}

/// `/etc/bonsai/init.json` for bonsai-init.
#[derive(Serialize)]
struct InitJson<'a> {
    hostname: &'a str,
    console: &'a str,
    mounts: Vec<MountJson>,
    tmpfiles: Vec<serde_json::Value>,
    early: Vec<Vec<String>>,
    setup: Vec<Vec<String>>,
    unmount: Vec<String>,
    services: Vec<serde_json::Value>,
    after_start: Vec<Vec<String>>,
    shutdown_timeout_ms: u64,
}

#[derive(Serialize)]
struct MountJson {
    source: String,
    target: String,
    fstype: String,
    options: String,
    mode: Option<u32>,
}

fn init_json(sys: &System) -> String {
    let tmpfiles = sys
        .steps
        .iter()
        .map(|s| match s {
            Step::Dir { path, mode, uid, gid } => {
                serde_json::json!({"type": "dir", "path": path, "mode": mode, "uid": uid, "gid": gid})
            }
            Step::File { path, content, mode, uid, gid } => {
                serde_json::json!({"type": "file", "path": path, "content": content, "mode": mode, "uid": uid, "gid": gid})
            }
            Step::Symlink { path, target } => serde_json::json!({"type": "symlink", "path": path, "target": target}),
        });
    let mut setup: Vec<Vec<String>> = vec![vec!["/bin/mkdir".into(), "-p".into()]];
    setup[0].extend(RUN_DIRS.iter().map(|d| d.to_string()));
    setup.push(
        ["/bin/ip", "link", "set", "lo", "up"]
            .map(String::from)
            .to_vec(),
    );
    setup.extend(sys.network.iter().cloned());
    setup.push(vec!["/etc/bonsai/slot".into()]);
    let services = sys
        .services
        .iter()
        .map(|svc| {
            let output = match svc.output {
                Output::Console => serde_json::json!({"console": format!("[{}] ", svc.name)}),
                Output::Log => {
                    serde_json::json!({"file": format!("/run/log/{}/current", svc.name)})
                }
            };
            serde_json::json!({
                "name": svc.name,
                "argv": svc.argv,
                "kind": kind_name(svc.kind),
                "after": svc.after,
                "restart": svc.restart.as_str(),
                "backoff_initial_ms": svc.restart_delay_ms,
                "backoff_max_ms": svc.restart_max_delay_ms,
                "uid": svc.uid,
                "gid": svc.gid,
                "env": svc.environment.iter().map(|(k, v)| [k, v]).collect::<Vec<_>>(),
                "cwd": svc.working_directory,
                "output": output,
                "stop_signal": svc.stop_signal.1,
                "stop_command": svc.stop_command,
                "stop_timeout_ms": svc.stop_timeout_ms,
                "ready_file": format!("/run/bonsai/up/{}", svc.name),
            })
        })
        .collect();
    let json = InitJson {
        hostname: &sys.hostname,
        console: "/dev/console",
        mounts: MOUNTS
            .iter()
            .map(|(src, target, fstype, opts)| MountJson {
                source: src.to_string(),
                target: target.to_string(),
                fstype: fstype.to_string(),
                options: opts.to_string(),
                mode: None,
            })
            .collect(),
        tmpfiles: tmpfiles.collect(),
        early: early_steps(sys),
        setup,
        unmount: sys.mounts.iter().rev().map(|m| m.target.clone()).collect(),
        services,
        after_start: vec![vec!["/etc/bonsai/harness".into()]],
        shutdown_timeout_ms: sys
            .longruns()
            .map(|s| s.stop_timeout_ms)
            .sum::<u64>()
            .max(3000)
            + 2000,
    };
    serde_json::to_string_pretty(&json).unwrap_or_default() + "\n"
}

/// runsv's and s6-supervise's service folder: run, finish and log/run hand over to the shared
/// scripts under /etc/bonsai/svc/<name>/.
fn service_dir(dir: &str, name: &str) -> Vec<(String, Node)> {
    [
        ("run", format!("exec /etc/bonsai/svc/{name}/run")),
        (
            "finish",
            format!("exec /etc/bonsai/svc/{name}/finish \"$@\""),
        ),
        ("log/run", format!("exec /etc/bonsai/svc/{name}/log")),
    ]
    .into_iter()
    .map(|(f, body)| {
        (
            format!("{dir}/{f}"),
            file(format!("#!/bin/sh\n{body}\n"), 0o755),
        )
    })
    .collect()
}

/// Adds the backend's files and the shared service files to `tree`.
pub fn render(tree: &mut Tree, sys: &System, inputs: &InitInputs) -> Result<()> {
    let backend = inputs.backend;
    let exe = |p: &str, text: String| -> (String, Node) { (p.to_string(), file(text, 0o755)) };
    let mut files: Vec<(String, Node)> = vec![
        exe("etc/bonsai/setup", setup_script(sys)),
        exe("etc/bonsai/oneshots", oneshots_script(sys)),
        exe("etc/bonsai/harness", harness_script(sys, backend != Backend::BonsaiInit)),
        exe("etc/bonsai/slot", slot_script(sys)),
        exe("etc/bonsai/health", health_script(sys, &inputs.busybox)),
        exe("etc/bonsai/shutdown", shutdown_script(sys, backend)),
        exe("etc/bonsai/final", FINAL.to_string()),
        ("etc/bonsai/init-name".into(), file(format!("{}\n", backend.name()), 0o644)),
        exe(
            "etc/bonsai/stage1",
            "#!/bin/sh\n# stage 1 of the shell backends: setup, then oneshots in order\n/etc/bonsai/setup\n/etc/bonsai/oneshots\n".into(),
        ),
    ];
    if let Some(m) = &sys.modules {
        files.push(exe("etc/bonsai/modules", modules_script(m)));
    }
    if let Some(d) = &sys.devices {
        files.push(exe(
            crate::devices::SETTLE_SCRIPT.trim_start_matches('/'),
            crate::devices::SETTLE.to_string(),
        ));
        if backend == Backend::BonsaiInit {
            files.push((
                "etc/bonsai/devices.json".into(),
                file(crate::devices::devices_json(d), 0o644),
            ));
        } else {
            files.push(exe(
                crate::devices::DEVICES_SCRIPT.trim_start_matches('/'),
                crate::devices::DEVICES.to_string(),
            ));
            files.push(exe(
                "etc/bonsai/uevent",
                crate::devices::UEVENT_SCRIPT.to_string(),
            ));
            files.push(exe("etc/bonsai/devrule", crate::devices::devrule_script(d)));
            files.push((
                "etc/mdev.conf".into(),
                file(crate::devices::mdev_conf(d), 0o644),
            ));
        }
    }
    if !sys.mounts.is_empty() {
        files.push(exe("etc/bonsai/mounts", mounts_script(sys)));
        files.push(exe("etc/bonsai/unmounts", unmounts_script(sys)));
    }
    if sys
        .network
        .iter()
        .any(|c| c.first().map(String::as_str) == Some(crate::system::DHCP_SCRIPT))
    {
        files.push(exe("etc/bonsai/dhcp", DHCP.to_string()));
        files.push(exe("etc/bonsai/udhcpc", UDHCPC.to_string()));
    }
    for (i, step) in sys.steps.iter().enumerate() {
        if let Step::File { content, .. } = step {
            files.push((
                format!("etc/bonsai/setup-files/{i}"),
                file(content.clone(), 0o600),
            ));
        }
    }
    for svc in &sys.services {
        let base = format!("etc/bonsai/svc/{}", svc.name);
        files.push(exe(&format!("{base}/run"), run_script(svc, sys)));
        files.push(exe(&format!("{base}/exec"), exec_script(svc)));
        files.push(exe(&format!("{base}/log"), log_script(svc, backend)));
        files.push(exe(&format!("{base}/finish"), finish_script(svc, backend)));
    }
    // Shutdown commands that go through bonsai's ordered stop.
    for (name, action) in [
        ("poweroff", "poweroff"),
        ("reboot", "reboot"),
        ("halt", "halt"),
    ] {
        if matches!(backend, Backend::Runit | Backend::S6) {
            files.push(exe(
                &format!("bin/{name}"),
                format!("#!/bin/sh\nexec /etc/bonsai/shutdown {action}\n"),
            ));
        }
    }

    match backend {
        Backend::Busybox => {
            files.push((
                "init".into(),
                Node::symlink(format!("{}/bin/busybox", inputs.busybox)),
            ));
            let mut inittab = String::from(
                "# generated by bonsai: busybox init (SysV-style)\n::sysinit:/etc/bonsai/stage1\n",
            );
            for svc in sys.longruns() {
                let _ = writeln!(inittab, "::once:/etc/bonsai/svc/{}/supervise", svc.name);
                files.push(exe(
                    &format!("etc/bonsai/svc/{}/supervise", svc.name),
                    supervise_script(svc),
                ));
            }
            inittab.push_str("::once:/etc/bonsai/harness\n::ctrlaltdel:/bin/reboot\n::shutdown:/etc/bonsai/shutdown\n");
            files.push(("etc/inittab".into(), file(inittab, 0o644)));
        }
        Backend::Runit => {
            let runit = inputs.runit.clone().unwrap_or_default();
            files.push((
                "init".into(),
                Node::symlink(format!("{runit}/bin/runit-init")),
            ));
            files.push(exe(
                "etc/runit/1",
                "#!/bin/sh\nexec /etc/bonsai/stage1\n".into(),
            ));
            files.push(exe(
                "etc/runit/2",
                "#!/bin/sh\n/etc/bonsai/harness &\nexec env - PATH=/bin runsvdir -P /etc/service\n"
                    .into(),
            ));
            files.push(exe("etc/runit/3", "#!/bin/sh\nexport PATH=/bin\n/etc/bonsai/shutdown \"$(cat /run/bonsai/action 2>/dev/null || echo poweroff)\" >/dev/null 2>&1 </dev/null &\nsync\n".into()));
            tree.insert("etc/service", Node::dir(0o755))?;
            for svc in sys.longruns() {
                let d = format!("etc/service/{}", svc.name);
                let n = &svc.name;
                files.extend(service_dir(&d, n));
                // runsv runs control/t instead of sending TERM, for `down` and `exit` alike
                // (control/d would run after the TERM, not instead of it).
                if svc.stop_signal.0 != "TERM" {
                    files.push(exe(
                        &format!("{d}/control/t"),
                        format!(
                            "#!/bin/sh\nkill -{} \"$(cat supervise/pid)\"\n",
                            svc.stop_signal.0
                        ),
                    ));
                }
            }
        }
        Backend::S6 => {
            files.push(exe(
                "init",
                "#!/bin/sh\n# s6: stage 1, then s6-svscan as PID 1\nexport PATH=/bin\n/etc/bonsai/stage1\n/etc/bonsai/harness &\nexec s6-svscan /etc/s6/scan\n".into(),
            ));
            files.push(exe(
                "etc/s6/scan/.s6-svscan/finish",
                "#!/bin/sh\nexec /etc/bonsai/final\n".into(),
            ));
            files.push(exe(
                "etc/s6/scan/.s6-svscan/crash",
                "#!/bin/sh\nexec /bin/sh\n".into(),
            ));
            for svc in sys.longruns() {
                let d = format!("etc/s6/scan/{}", svc.name);
                let n = &svc.name;
                files.extend(service_dir(&d, n));
                files.push((
                    format!("{d}/timeout-finish"),
                    file(format!("{}\n", svc.restart_max_delay_ms + 2000), 0o644),
                ));
                files.push((
                    format!("{d}/down-signal"),
                    file(format!("SIG{}\n", svc.stop_signal.0), 0o644),
                ));
            }
        }
        Backend::BonsaiInit => {
            let bin = inputs
                .bonsai_init
                .clone()
                .ok_or_else(|| crate::error::Error::Compose {
                    message: "bonsai-init backend needs the bonsai-init binary".into(),
                })?;
            files.push((
                "bin/bonsai-init".into(),
                Node::file(Source::Host(bin), 0o755),
            ));
            files.push(("init".into(), Node::symlink("bin/bonsai-init")));
            files.push(("etc/bonsai/init.json".into(), file(init_json(sys), 0o644)));
        }
    }
    crate::faults::apply(&mut files, &inputs.faults);
    for (path, node) in files {
        tree.insert(&path, node)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::{validate, ServiceSpec, SystemSpec};

    fn system() -> System {
        let mut spec = SystemSpec::default();
        let svc: ServiceSpec =
            serde_json::from_str(r#"{"command": ["/bin/sleep", "1000"], "stop-signal": "INT"}"#)
                .unwrap();
        spec.services.insert("sleeper".into(), svc);
        let one: ServiceSpec =
            serde_json::from_str(r#"{"command": ["/bin/true"], "kind": "oneshot"}"#).unwrap();
        spec.services.insert("prep".into(), one);
        validate(&spec, "host", &|_| true).unwrap()
    }

    fn inputs(b: Backend) -> InitInputs {
        InitInputs {
            backend: b,
            busybox: "/nix/store/b-busybox".into(),
            runit: Some("/nix/store/r-runit".into()),
            s6: Some("/nix/store/s-s6".into()),
            bonsai_init: Some("/dev/null".into()),
            faults: Vec::new(),
        }
    }

    /// The record bonsai-init writes to the kernel log, read from its source: the writer's
    /// own constant, not a copy of the words the harness looks for.
    fn pid1_services_up_record() -> String {
        let src = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pid1/src/supervisor.rs"),
        )
        .unwrap();
        let line = src
            .lines()
            .find(|l| l.starts_with("pub const SERVICES_UP_RECORD: &str = "))
            .expect("SERVICES_UP_RECORD in pid1/src/supervisor.rs");
        line.split('"').nth(1).unwrap().to_string()
    }

    /// The harness reads the services-up moment back from the kernel log: its `dmesg` line,
    /// run by a real shell over busybox-style `dmesg` output holding the record as
    /// bonsai-init writes it, picks the last record's time; under the other inits the
    /// harness writes the same record itself.
    #[test]
    fn harness_reads_services_up_from_the_kernel_log() {
        let record = pid1_services_up_record();
        let script = harness_script(&system(), true);
        let line = script
            .lines()
            .find(|l| l.starts_with("services_up=$(dmesg"))
            .expect("the dmesg line");
        let log = format!(
            "[    0.714359] Run /init as init process\n\
             [    0.772588] {record} later\n\
             [    0.793963] {record}\n\
             [   12.500000] {record}\n\
             [   13.000000] something else\n"
        );
        let program =
            format!("dmesg() {{ printf '{log}'; }}\n{line}\nprintf '%s' \"$services_up\"");
        let out = std::process::Command::new("sh")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "12.500000");
        assert!(script.contains(&format!("echo '<7>{record}' >/dev/kmsg")));
    }

    #[test]
    fn every_backend_renders_its_pid1_and_the_shared_scripts() {
        for b in ALL {
            let mut t = Tree::new();
            render(&mut t, &system(), &inputs(b)).unwrap();
            assert!(t.contains("init"), "{b:?}");
            assert!(t.contains("etc/bonsai/svc/sleeper/run"), "{b:?}");
            assert!(t.contains("etc/bonsai/harness"), "{b:?}");
        }
        let mut t = Tree::new();
        render(&mut t, &system(), &inputs(Backend::Busybox)).unwrap();
        let Some(Node {
            kind:
                crate::tree::NodeKind::File {
                    source: Source::Bytes(b),
                },
            ..
        }) = t.get("etc/inittab")
        else {
            panic!("no inittab")
        };
        let inittab = String::from_utf8(b.clone()).unwrap();
        assert!(inittab.contains("::once:/etc/bonsai/svc/sleeper/supervise"));
        assert!(
            !inittab.contains("prep/supervise"),
            "oneshots are not supervised"
        );
    }

    const ALL: [Backend; 4] = [
        Backend::Busybox,
        Backend::Runit,
        Backend::S6,
        Backend::BonsaiInit,
    ];

    fn text(t: &Tree, path: &str) -> String {
        match t.get(path) {
            Some(Node {
                kind:
                    crate::tree::NodeKind::File {
                        source: Source::Bytes(b),
                    },
                ..
            }) => String::from_utf8(b.clone()).unwrap(),
            _ => panic!("no file {path}"),
        }
    }

    /// Slot, watchdog and health are one description on every backend: the same two scripts,
    /// the slot step run at setup (by the shell setup or by bonsai-init's setup commands), the
    /// health step run by the shared harness once services are up.
    #[test]
    fn every_backend_runs_the_same_slot_watchdog_and_health_steps() {
        let spec = SystemSpec {
            health: serde_json::from_str(
                r#"{"trial-deadline-ms": 20500, "checks": {"net": {"command": ["/bin/ping", "-c", "1", "10.0.2.2"], "deadline-ms": 4000}}}"#,
            )
            .unwrap(),
            ..SystemSpec::default()
        };
        let sys = validate(&spec, "h", &|_| true).unwrap();
        let mut rendered = Vec::new();
        for b in ALL {
            let mut t = Tree::new();
            render(&mut t, &sys, &inputs(b)).unwrap();
            let slot = text(&t, "etc/bonsai/slot");
            let health = text(&t, "etc/bonsai/health");
            // The petter's deadline in whole seconds, rounded up; the check with its deadline.
            assert!(slot.contains("bonsai-watchdog 21 "), "{slot}");
            assert!(
                health
                    .contains("health net 4000 /bin/ping -c 1 10.0.2.2 || failed=\"$failed net\""),
                "{health}"
            );
            assert!(
                health.contains("/bin/busybox reboot -f"),
                "{b:?}: not the forced reboot"
            );
            assert!(
                text(&t, "etc/bonsai/harness").contains("/etc/bonsai/health \"${nonce:-none}\"")
            );
            match b {
                Backend::BonsaiInit => {
                    let json: serde_json::Value =
                        serde_json::from_str(&text(&t, "etc/bonsai/init.json")).unwrap();
                    let setup = json["setup"].as_array().unwrap();
                    assert_eq!(
                        setup.last().unwrap(),
                        &serde_json::json!(["/etc/bonsai/slot"])
                    );
                }
                _ => assert!(text(&t, "etc/bonsai/setup").ends_with("/etc/bonsai/slot\nexit 0\n")),
            }
            rendered.push((slot, health));
        }
        assert!(
            rendered.windows(2).all(|w| w[0] == w[1]),
            "the scripts differ between backends"
        );
    }

    #[test]
    fn health_checks_need_a_program_and_a_deadline_inside_the_trial() {
        let check = |json: &str, exists: &dyn Fn(&str) -> bool| {
            let spec = SystemSpec {
                health: serde_json::from_str(json).unwrap(),
                ..SystemSpec::default()
            };
            validate(&spec, "h", exists).map(|s| s.health)
        };
        let h = check(r#"{"checks": {"a": {"command": ["/bin/true"]}}}"#, &|_| {
            true
        })
        .unwrap();
        assert_eq!(
            h.trial_deadline_ms,
            crate::system::DEFAULT_TRIAL_DEADLINE_MS
        );
        assert_eq!(h.checks[0].deadline_ms, 10_000);
        assert_eq!(
            check(r#"{"checks": {"a": {"command": ["/bin/nope"]}}}"#, &|p| p
                != "/bin/nope")
            .unwrap_err(),
            "health.checks.a.command: program '/bin/nope' is not in the image"
        );
        assert_eq!(
            check(r#"{"checks": {"a": {"command": []}}}"#, &|_| true).unwrap_err(),
            "health.checks.a.command: empty"
        );
        assert_eq!(
            check(
                r#"{"trial-deadline-ms": 5000, "checks": {"a": {"command": ["/bin/true"], "deadline-ms": 5000}}}"#,
                &|_| true
            )
            .unwrap_err(),
            "health.checks.a.deadline-ms: 5000 must be above 0 and below the trial deadline (5000 ms)"
        );
        assert_eq!(
            check(r#"{"trial-deadline-ms": 10}"#, &|_| true).unwrap_err(),
            "health.trial-deadline-ms: 10 is outside 1000..=3600000"
        );
    }

    /// Each stop hook has one owner: the shared shutdown script under the shell-driven
    /// backends (newest service first), bonsai-init itself under bonsai-init.
    #[test]
    fn stop_hooks_have_one_owner_on_every_backend() {
        let mut spec = SystemSpec::default();
        for (name, after) in [("first", "[]"), ("second", r#"["first"]"#)] {
            let svc: ServiceSpec = serde_json::from_str(&format!(
                r#"{{"command": ["/bin/sleep", "1000"], "after": {after},
                    "stop-command": ["/bin/echo", "stop-hook {name}"]}}"#
            ))
            .unwrap();
            spec.services.insert(name.into(), svc);
        }
        let sys = validate(&spec, "host", &|_| true).unwrap();
        for b in ALL {
            let mut t = Tree::new();
            render(&mut t, &sys, &inputs(b)).unwrap();
            let script = text(&t, "etc/bonsai/shutdown");
            let hooks: Vec<&str> = script
                .lines()
                .filter_map(|l| l.split("stop-hook ").nth(1))
                .map(|rest| rest.split(|c: char| !c.is_alphanumeric()).next().unwrap())
                .collect();
            if b == Backend::BonsaiInit {
                assert!(hooks.is_empty(), "{b:?} runs {hooks:?} in the shell too");
                let json = text(&t, "etc/bonsai/init.json");
                assert_eq!(json.matches("stop-hook first").count(), 1, "{json}");
                assert_eq!(json.matches("stop-hook second").count(), 1, "{json}");
            } else {
                assert_eq!(hooks, ["second", "first"], "{b:?}:\n{script}");
            }
        }
    }

    /// runit: a service's stop signal replaces the TERM (runsv's control/t); control/d would
    /// run after the TERM. s6: its down-signal.
    #[test]
    fn the_stop_signal_replaces_term_under_runit_and_s6() {
        let mut spec = SystemSpec::default();
        let svc: ServiceSpec =
            serde_json::from_str(r#"{"command": ["/bin/sleep", "1000"], "stop-signal": "HUP"}"#)
                .unwrap();
        spec.services.insert("hupper".into(), svc);
        let sys = validate(&spec, "host", &|_| true).unwrap();
        let mut t = Tree::new();
        render(&mut t, &sys, &inputs(Backend::Runit)).unwrap();
        assert_eq!(
            text(&t, "etc/service/hupper/control/t"),
            "#!/bin/sh\nkill -HUP \"$(cat supervise/pid)\"\n"
        );
        assert!(t.get("etc/service/hupper/control/d").is_none());
        let mut t = Tree::new();
        render(&mut t, &sys, &inputs(Backend::S6)).unwrap();
        assert_eq!(text(&t, "etc/s6/scan/hupper/down-signal"), "SIGHUP\n");
    }

    /// While the checks run, the console shows KERN_WARNING (4) and worse: a WARN's trace
    /// (`---[ end trace`, printed at warning level) reaches the host's judge.
    #[test]
    fn kernel_warnings_reach_the_console_during_checks() {
        let script = harness_script(&system(), true);
        let levels: Vec<u32> = script
            .lines()
            .filter_map(|l| l.trim().strip_prefix("echo "))
            .filter_map(|l| l.strip_suffix(" >/proc/sys/kernel/printk"))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(levels.len(), 1, "{script}");
        assert!(
            levels[0] > 4,
            "console_loglevel {} hides warnings",
            levels[0]
        );
        let set = script.find("/proc/sys/kernel/printk").unwrap();
        assert!(set < script.find("/etc/bonsai/run-checks").unwrap());
    }

    #[test]
    fn quoting_survives_awkward_words() {
        assert_eq!(sh_quote("plain/path"), "plain/path");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn init_json_carries_services_in_order() {
        let json: serde_json::Value = serde_json::from_str(&init_json(&system())).unwrap();
        let names: Vec<&str> = json["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["prep", "sleeper"]);
        assert_eq!(json["services"][1]["stop_signal"], 2);
    }

    /// Modules before mounts (a disk's driver may be a module), on every backend; the mounts
    /// unmounted in reverse at shutdown; the coldplug loop is a real shell loop.
    #[test]
    fn modules_then_mounts_first_of_setup_and_unmounts_in_reverse() {
        let mut spec = SystemSpec::default();
        spec.kernel.modules = vec!["virtio_balloon".into(), "test_firmware".into()];
        spec.kernel.load = vec!["test_firmware".into()];
        for (dev, at) in [("/dev/vda", "/data"), ("/dev/vdb", "/data/more")] {
            spec.setup.mounts.push(
                serde_json::from_value(
                    serde_json::json!({"device": dev, "where": at, "type": "ext2"}),
                )
                .unwrap(),
            );
        }
        let sys = validate(&spec, "host", &|_| true).unwrap();
        let setup = setup_script(&sys);
        let (m, dev, d) = (
            setup.find("/etc/bonsai/modules\n").unwrap(),
            setup.find("/etc/bonsai/devices\n").unwrap(),
            setup.find("/etc/bonsai/mounts\n").unwrap(),
        );
        assert!(
            m < dev && dev < d && d < setup.find("hostname ").unwrap(),
            "{setup}"
        );
        let json: serde_json::Value = serde_json::from_str(&init_json(&sys)).unwrap();
        // Loadable modules bring the device handler (modalias loading at hotplug).
        assert_eq!(
            json["early"],
            serde_json::json!([
                ["/etc/bonsai/modules"],
                ["/bin/bonsai-init", "devices"],
                ["/etc/bonsai/mounts"]
            ])
        );
        assert_eq!(json["unmount"], serde_json::json!(["/data/more", "/data"]));
        let un = unmounts_script(&sys);
        assert!(
            un.find("/data/more").unwrap() < un.find(" /data ").unwrap(),
            "{un}"
        );
        // What the README says of a busy mount and of a device that never appears.
        assert!(
            un.contains("elif mount -o remount,ro /data; then echo \"bonsai: /data busy, remounted read-only\""),
            "{un}"
        );
        let mounts = mounts_script(&sys);
        assert!(
            mounts.contains("echo \"bonsai: mount /dev/vda on /data: no such device after 5000 ms\" >/dev/console\nelse"),
            "{mounts}"
        );
        for script in [&un, &mounts] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", script])
                .output()
                .unwrap();
            assert!(out.status.success(), "{script}");
        }
        let script = modules_script(sys.modules.as_ref().unwrap());
        assert!(
            script.contains("if modprobe test_firmware; then"),
            "{script}"
        );
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}");
        for b in ALL {
            let mut t = Tree::new();
            render(&mut t, &sys, &inputs(b)).unwrap();
            assert!(
                t.contains("etc/bonsai/modules") && t.contains("etc/bonsai/mounts"),
                "{b:?}"
            );
            // The device handler: mdev's files for the shell backends, JSON for bonsai-init.
            let shell = b != Backend::BonsaiInit;
            assert_eq!(t.contains("etc/mdev.conf"), shell, "{b:?}");
            assert_eq!(t.contains("etc/bonsai/devrule"), shell, "{b:?}");
            assert_eq!(t.contains("etc/bonsai/devices.json"), !shell, "{b:?}");
            assert!(t.contains("etc/bonsai/devices-settle"), "{b:?}");
        }
    }

    /// make-fs tells the device rules of the new filesystem (its label) and settles.
    #[test]
    fn make_fs_sends_a_change_when_device_rules_are_on() {
        let mut spec = SystemSpec::default();
        spec.setup.mounts.push(
            serde_json::from_value(serde_json::json!({"device": "/dev/vda", "where": "/data", "type": "vfat", "make-fs": true, "label": "d"}))
                .unwrap(),
        );
        let sys = validate(&spec, "host", &|_| true).unwrap();
        assert!(!mounts_script(&sys).contains("uevent"));
        spec.device_rules.push(crate::devices::DeviceRuleSpec {
            kernel: Some("vd*".into()),
            symlinks: vec!["disk/by-label/{label}".into()],
            ..Default::default()
        });
        let sys = validate(&spec, "host", &|_| true).unwrap();
        let m = mounts_script(&sys);
        assert!(
            m.contains(
                "echo change >\"/sys/class/block/${dev##*/}/uevent\" && /etc/bonsai/devices-settle"
            ),
            "{m}"
        );
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &m])
            .output()
            .unwrap();
        assert!(out.status.success(), "{m}");
    }
}
