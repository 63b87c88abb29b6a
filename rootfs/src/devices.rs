//! Device rules, bonsai's alternative to udev rules: one description (`[[device-rules]]` in a
//! profile) that every backend applies to the kernel's uevents, at coldplug and at hotplug.
//!
//! A rule matches an event on its subsystem, kernel name (glob), device type, sysfs attributes
//! and modalias; its actions are the node's owner, group and mode, symlinks under `/dev`, a
//! module to load, and commands run when the device is added or removed.
//!
//! - The shell backends (busybox init, runit, s6) render the rules as busybox `mdev.conf`, with
//!   mdev as the helper of busybox `uevent` (which reads the kernel's uevent netlink socket and
//!   runs its helper once per event, in order). What mdev.conf cannot say (attributes, symlinks
//!   beside the node, labels, the commands' once-per-device bookkeeping) is `/etc/bonsai/devrule`,
//!   which the rule's mdev line runs.
//! - bonsai-init applies the same rules natively (`bonsai-init devices`, from
//!   `/etc/bonsai/devices.json`) on its own netlink socket.
//!
//! Both do the same things in the same order, and keep the same state in `/run/bonsai/dev/`: a
//! file per rule and device, `<rule>@<devpath with / as !>`, listing the symlinks made for it.
//! It tells a later `remove` (when sysfs is already gone, so attributes cannot be read again)
//! which rules matched, and it makes `run-add` run once per appearance of a device: a `change`
//! event (and a repeated `add`) re-applies owner, mode and symlinks only.
//!
//! Coldplug writes `add` to every `uevent` file under `/sys/devices`; a settle barrier (a
//! `change` event for `/dev/null`'s device, which handlers answer by making
//! `/run/bonsai/dev/settled`) tells boot when every event before it has been handled.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// `[[device-rules]]` as written in a profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceRuleSpec {
    /// The event's `SUBSYSTEM`, exactly (`block`, `net`, `virtio`).
    pub subsystem: Option<String>,
    /// The kernel name (the last component of the device path: `vda`, `ttyS0`), a glob with
    /// `*` and `?`.
    pub kernel: Option<String>,
    /// The event's `DEVTYPE`, exactly (`disk`, `partition`).
    pub devtype: Option<String>,
    /// Attributes of the device in sysfs and their values, exactly (trailing newlines dropped):
    /// `{ size = "65536" }`. Read when the device is added.
    #[serde(default)]
    pub attrs: BTreeMap<String, String>,
    /// The event's `MODALIAS`, a glob with `*` and `?`.
    pub modalias: Option<String>,
    /// The node's owner (a `[users]` name or root).
    pub owner: Option<String>,
    /// The node's group (a `[groups]` name; the owner's group when absent).
    pub group: Option<String>,
    /// The node's mode, octal (`"0660"`).
    pub mode: Option<String>,
    /// Links to the node, relative to `/dev`: `disk/by-label/{label}`, `serial/{kernel}`.
    /// `{kernel}` is the kernel name; `{label}` the label of the ext2/3/4 or FAT filesystem on
    /// the device (no link when it has none).
    #[serde(default)]
    pub symlinks: Vec<String>,
    /// A module loaded when the device is added (it must be in `[kernel] modules`).
    pub load_module: Option<String>,
    /// A shell command run once when the device appears (after the other actions), with the
    /// event's variables (`ACTION`, `DEVPATH`, `DEVNAME`, `SUBSYSTEM`, …) in its environment.
    pub run_add: Option<String>,
    /// A shell command run once when the device goes.
    pub run_remove: Option<String>,
}

/// One rule, checked: owners resolved to numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceRule {
    pub subsystem: Option<String>,
    pub kernel: Option<String>,
    pub devtype: Option<String>,
    pub attrs: Vec<(String, String)>,
    pub modalias: Option<String>,
    /// Owner, group and mode together: a rule that sets any of them sets all three (root and
    /// root's group unless it names others; 0600, devtmpfs' own, unless it names a mode).
    pub node: Option<NodeAccess>,
    pub symlinks: Vec<String>,
    pub load_module: Option<String>,
    pub run_add: Option<String>,
    pub run_remove: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NodeAccess {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The rules and what the image needs to apply them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Devices {
    pub rules: Vec<DeviceRule>,
    /// Load modules by modalias on every `add` (the image carries loadable modules).
    pub modprobe: bool,
}

/// The shell backends' device step (bonsai-init's is `bonsai-init devices`).
pub const DEVICES_SCRIPT: &str = "/etc/bonsai/devices";
/// Waits until every uevent before it has been handled.
pub const SETTLE_SCRIPT: &str = "/etc/bonsai/devices-settle";
/// Where both implementations keep what they did per rule and device.
pub const STATE_DIR: &str = "/run/bonsai/dev";

fn check_glob(g: &str, key: &str) -> Result<(), String> {
    if g.is_empty()
        || g.chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/;\"'\\[]".contains(c))
    {
        return Err(format!(
            "{key}: '{g}' is not a glob bonsai takes (no spaces, quotes, '/', ';', '\\' or brackets; '*' and '?' match)"
        ));
    }
    Ok(())
}

fn check_word(w: &str, key: &str) -> Result<(), String> {
    if w.is_empty()
        || !w
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
    {
        return Err(format!("{key}: '{w}' is not a plain name"));
    }
    Ok(())
}

/// Whether `name` matches `glob` (`*` any run, `?` one character).
pub fn glob_match(glob: &str, name: &str) -> bool {
    fn go(g: &[char], n: &[char]) -> bool {
        match g.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&g, &n)
}

/// Resolves a rule's owner and group (`key`, owner, group) to a uid and gid.
pub type Resolve<'a> =
    dyn Fn(&str, &Option<String>, &Option<String>) -> Result<(u32, u32), String> + 'a;

/// Checks `[[device-rules]]`. `resolve` gives the uid and gid of an owner/group pair (errors
/// name the key); `modules` are `[kernel] modules` (normalised names).
pub fn validate(
    specs: &[DeviceRuleSpec],
    resolve: &Resolve,
    modules: &[String],
    program_exists: &dyn Fn(&str) -> bool,
) -> Result<Option<Devices>, String> {
    if specs.is_empty() && modules.is_empty() {
        return Ok(None);
    }
    let mut rules = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let key = format!("device-rules[{i}]");
        if s.subsystem.is_none()
            && s.kernel.is_none()
            && s.devtype.is_none()
            && s.modalias.is_none()
            && s.attrs.is_empty()
        {
            return Err(format!(
                "{key}: matches every event; give subsystem, kernel, devtype, attrs or modalias"
            ));
        }
        for (k, v) in [("subsystem", &s.subsystem), ("devtype", &s.devtype)] {
            if let Some(v) = v {
                check_word(v, &format!("{key}.{k}"))?;
            }
        }
        for (k, v) in [("kernel", &s.kernel), ("modalias", &s.modalias)] {
            if let Some(v) = v {
                check_glob(v, &format!("{key}.{k}"))?;
            }
        }
        for (a, v) in &s.attrs {
            if a.is_empty()
                || a == "."
                || a == ".."
                || !a
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(format!("{key}.attrs: '{a}' is not a sysfs attribute name"));
            }
            if v.contains('\n') || v.contains('\'') {
                return Err(format!(
                    "{key}.attrs.{a}: the value holds a newline or a quote"
                ));
            }
        }
        let node = if s.owner.is_some() || s.group.is_some() || s.mode.is_some() {
            let (uid, gid) = resolve(&key, &s.owner, &s.group)?;
            let mode = match &s.mode {
                Some(m) => u32::from_str_radix(m, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("{key}.mode: '{m}' is not an octal mode"))?,
                None => 0o600,
            };
            Some(NodeAccess { uid, gid, mode })
        } else {
            None
        };
        for l in &s.symlinks {
            let key = format!("{key}.symlinks");
            let plain = l.replace("{kernel}", "k").replace("{label}", "l");
            if l.starts_with('/')
                || l.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                || !plain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./:+@".contains(c))
            {
                return Err(format!(
                    "{key}: '{l}' is not a path under /dev (relative, plain characters, placeholders {{kernel}} and {{label}})"
                ));
            }
        }
        let load_module = match &s.load_module {
            Some(m) => {
                let name = crate::system::module_name(m);
                if !modules.contains(&name) {
                    return Err(format!("{key}.load-module: '{m}' is not in kernel.modules"));
                }
                Some(name)
            }
            None => None,
        };
        for (k, v) in [("run-add", &s.run_add), ("run-remove", &s.run_remove)] {
            if v.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(format!("{key}.{k}: empty command"));
            }
        }
        rules.push(DeviceRule {
            subsystem: s.subsystem.clone(),
            kernel: s.kernel.clone(),
            devtype: s.devtype.clone(),
            attrs: s
                .attrs
                .iter()
                .map(|(a, v)| (a.clone(), v.clone()))
                .collect(),
            modalias: s.modalias.clone(),
            node,
            symlinks: s.symlinks.clone(),
            load_module,
            run_add: s.run_add.clone(),
            run_remove: s.run_remove.clone(),
        });
    }
    for p in ["uevent", "mdev"] {
        if !program_exists(p) {
            return Err(format!(
                "device-rules: applying device rules needs busybox {p}, which the image does not have"
            ));
        }
    }
    Ok(Some(Devices {
        rules,
        modprobe: !modules.is_empty(),
    }))
}

/// A glob as the POSIX extended regex mdev matches (whole names).
fn glob_regex(g: &str) -> String {
    let mut r = String::new();
    for c in g.chars() {
        match c {
            '*' => r.push_str(".*"),
            '?' => r.push('.'),
            c if ".+()^$|{}".contains(c) => {
                r.push('\\');
                r.push(c);
            }
            c => r.push(c),
        }
    }
    r
}

fn regex_word(w: &str) -> String {
    glob_regex(&w.replace(['*', '?'], ""))
}

/// `/etc/mdev.conf`: one line per rule, in order, none final (`-`), so every matching rule
/// applies, as in bonsai-init. mdev sets owner, group and mode itself for a rule without
/// attributes; a rule with attributes (which mdev cannot match) has `!` (mdev leaves the node
/// alone) and its `devrule` applies them once the attributes matched. Every line runs
/// `devrule <n>` on add and on remove (`*`). Last, with loadable modules, the usual
/// modalias line.
pub fn mdev_conf(d: &Devices) -> String {
    let mut s = String::from(
        "# bonsai: [[device-rules]], rendered for busybox mdev (see /etc/bonsai/devrule)\n",
    );
    for (i, r) in d.rules.iter().enumerate() {
        let mut line = String::from("-");
        if let Some(v) = &r.subsystem {
            let _ = write!(line, "SUBSYSTEM={};", regex_word(v));
        }
        if let Some(v) = &r.devtype {
            let _ = write!(line, "DEVTYPE={};", regex_word(v));
        }
        if let Some(v) = &r.modalias {
            let _ = write!(line, "MODALIAS={};", glob_regex(v));
        }
        line.push_str(
            &r.kernel
                .as_deref()
                .map(glob_regex)
                .unwrap_or_else(|| ".*".into()),
        );
        match (&r.node, r.attrs.is_empty()) {
            (Some(n), true) => {
                let _ = write!(line, " {}:{} {:03o} ", n.uid, n.gid, n.mode);
            }
            _ => line.push_str(" 0:0 600 ! "),
        }
        let _ = writeln!(line, "*/etc/bonsai/devrule {i}");
        s.push_str(&line);
    }
    if d.modprobe {
        s.push_str("-$MODALIAS=.* 0:0 600 ! @modprobe -q \"$MODALIAS\"\n");
    }
    s
}

/// The shell function that prints the label of the filesystem on a device: ext2/3/4 (the
/// superblock's volume name) or FAT (the boot sector's label, trailing spaces dropped; none for
/// `NO NAME`). Nothing for anything else.
pub(crate) const FSLABEL: &str = r#"fslabel() {
	b() { dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null | tr -d '\000'; }
	if [ "$(dd if="$1" bs=1 skip=1080 count=2 2>/dev/null)" = "$(printf 'S\357')" ]; then
		b "$1" 1144 16
	elif [ "$(b "$1" 82 5)" = FAT32 ]; then
		b "$1" 71 11 | sed 's/ *$//;/^NO NAME$/d'
	elif [ "$(b "$1" 54 3)" = FAT ]; then
		b "$1" 43 11 | sed 's/ *$//;/^NO NAME$/d'
	fi
}
"#;

/// `/etc/bonsai/devrule <n>`: one rule's actions for one event, from mdev's environment.
pub fn devrule_script(d: &Devices) -> String {
    let mut s = String::from(
        "#!/bin/sh\n# [[device-rules]] rule <n> for one event (mdev runs it with the event's variables)\nexport PATH=/bin\nn=$1\nstate=/run/bonsai/dev/$n@$(echo \"$DEVPATH\" | tr / !)\nk=${DEVPATH##*/}\n",
    );
    s.push_str(FSLABEL);
    s.push_str("if [ \"$ACTION\" = remove ]; then\n\t[ -e \"$state\" ] || exit 0\n\twhile read -r l; do rm -f \"$l\"; done <\"$state\"\n\trm -f \"$state\"\n\tcase $n in\n");
    for (i, r) in d.rules.iter().enumerate() {
        if let Some(c) = &r.run_remove {
            let _ = writeln!(s, "\t{i}) ( {c}\n\t) </dev/null >/dev/console 2>&1 ;;");
        }
    }
    s.push_str("\tesac\n\texit 0\nfi\nfirst=\n[ -e \"$state\" ] || first=1\ncase $n in\n");
    for (i, r) in d.rules.iter().enumerate() {
        let _ = writeln!(s, "{i})");
        for (a, v) in &r.attrs {
            let _ = writeln!(
                s,
                "\t[ \"$(cat \"/sys$DEVPATH/{a}\" 2>/dev/null)\" = '{v}' ] || exit 0"
            );
        }
        if let (Some(n), false) = (&r.node, r.attrs.is_empty()) {
            let _ = writeln!(
                s,
                "\t[ -n \"$DEVNAME\" ] && [ -e \"/dev/$DEVNAME\" ] && chown {}:{} \"/dev/$DEVNAME\" && chmod {:o} \"/dev/$DEVNAME\"",
                n.uid, n.gid, n.mode
            );
        }
        s.push_str("\t[ -e \"$state\" ] && while read -r l; do rm -f \"$l\"; done <\"$state\"\n\t: >\"$state\"\n");
        if !r.symlinks.is_empty() {
            s.push_str("\tif [ -n \"$DEVNAME\" ]; then\n");
            if r.symlinks.iter().any(|l| l.contains("{label}")) {
                s.push_str("\t\tlabel=$(fslabel \"/dev/$DEVNAME\" | tr -c 'A-Za-z0-9._\\n-' _)\n");
            }
            for l in &r.symlinks {
                let depth = l.matches('/').count();
                let path = l.replace("{kernel}", "$k").replace("{label}", "$label");
                let guard = if l.contains("{label}") {
                    "[ -n \"$label\" ] && "
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "\t\t{guard}{{ l=\"/dev/{path}\"; mkdir -p \"${{l%/*}}\"; ln -sfn \"{}$DEVNAME\" \"$l\" && echo \"$l\" >>\"$state\"; }}",
                    "../".repeat(depth)
                );
            }
            s.push_str("\tfi\n");
        }
        if let Some(m) = &r.load_module {
            let _ = writeln!(s, "\t[ -n \"$first\" ] && modprobe {m}");
        }
        if let Some(c) = &r.run_add {
            let _ = writeln!(
                s,
                "\t[ -n \"$first\" ] && ( {c}\n\t) </dev/null >/dev/console 2>&1"
            );
        }
        s.push_str("\t;;\n");
    }
    s.push_str("esac\nexit 0\n");
    s
}

/// `/etc/bonsai/uevent`: busybox `uevent`'s helper, once per event. The settle barrier makes
/// its mark; a `change` is applied as an `add` (mdev ignores `change`), which re-applies a
/// device's owner, mode and symlinks (`devrule` runs `run-add` only once per device).
pub const UEVENT_SCRIPT: &str = r#"#!/bin/sh
# one uevent: the settle barrier, else mdev with [[device-rules]]' /etc/mdev.conf
export PATH=/bin
if [ "$ACTION" = change ] && [ "$DEVPATH" = /devices/virtual/mem/null ]; then
	: >/run/bonsai/dev/settled
	exit 0
fi
[ "$ACTION" = change ] && export ACTION=add
exec mdev
"#;

/// `/etc/bonsai/devices-settle`: a `change` for /dev/null's device, then waits (up to 10 s)
/// for the handler's mark; every event the kernel sent before has been handled by then.
pub const SETTLE: &str = r#"#!/bin/sh
# waits until the device handler has handled every uevent sent before this
export PATH=/bin
rm -f /run/bonsai/dev/settled
i=0
while [ $i -lt 500 ]; do
	[ $((i % 50)) = 0 ] && echo change >/sys/devices/virtual/mem/null/uevent
	[ -e /run/bonsai/dev/settled ] && exit 0
	usleep 20000
	i=$((i + 1))
done
echo "bonsai: devices: the device handler did not settle within 10 s" >/dev/console
exit 1
"#;

/// `/etc/bonsai/devices`: the shell backends' device step, after the modules step and before
/// the mounts. It starts busybox `uevent` with `/etc/bonsai/uevent` (the handler for the rest
/// of the boot: hotplug), waits until it listens, writes `add` to every `uevent` under
/// /sys/devices (coldplug) and settles.
pub const DEVICES: &str = r#"#!/bin/sh
# [[device-rules]]: the uevent handler (busybox uevent + mdev), then coldplug
export PATH=/bin
mkdir -p /run/bonsai/dev
uevent /etc/bonsai/uevent </dev/null >/dev/null 2>&1 &
/etc/bonsai/devices-settle || exit 1
for u in $(find /sys/devices -name uevent); do echo add >"$u"; done 2>/dev/null
/etc/bonsai/devices-settle
n=$(ls /run/bonsai/dev | grep -c @)
echo "bonsai: devices: coldplug done, $n rule matches" >/dev/console
"#;

/// `/etc/bonsai/devices.json` for bonsai-init.
pub fn devices_json(d: &Devices) -> String {
    serde_json::to_string_pretty(d).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(key: &str, o: &Option<String>, g: &Option<String>) -> Result<(u32, u32), String> {
        let uid = match o.as_deref() {
            None | Some("root") => 0,
            Some("kiosk") => 1000,
            Some(u) => return Err(format!("{key}.owner: unknown user '{u}'")),
        };
        let gid = match g.as_deref() {
            None => uid,
            Some("disk") => 6,
            Some(x) => return Err(format!("{key}.group: unknown group '{x}'")),
        };
        Ok((uid, gid))
    }

    fn all(_: &str) -> bool {
        true
    }

    fn disk_rule() -> DeviceRuleSpec {
        DeviceRuleSpec {
            subsystem: Some("block".into()),
            kernel: Some("vd*".into()),
            devtype: Some("disk".into()),
            group: Some("disk".into()),
            mode: Some("0660".into()),
            symlinks: vec!["disk/by-label/{label}".into(), "data".into()],
            run_add: Some("echo add $DEVNAME >>/run/log".into()),
            run_remove: Some("echo remove $DEVNAME >>/run/log".into()),
            ..Default::default()
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("vd*", "vda"));
        assert!(glob_match("vd?", "vdb"));
        assert!(!glob_match("vd?", "vda1"));
        assert!(glob_match("*", ""));
        assert!(glob_match(
            "virtio:d00000005v*",
            "virtio:d00000005v00001AF4"
        ));
        assert!(!glob_match("vd*", "sda"));
        assert_eq!(glob_regex("virtio:d0000000?v*"), "virtio:d0000000.v.*");
        assert_eq!(glob_regex("a.b+c"), "a\\.b\\+c");
    }

    #[test]
    fn mdev_lines_match_what_the_rule_matches_and_let_mdev_set_the_mode() {
        let d = validate(&[disk_rule()], &resolve, &["virtio_balloon".into()], &all)
            .unwrap()
            .unwrap();
        assert_eq!(
            mdev_conf(&d),
            "# bonsai: [[device-rules]], rendered for busybox mdev (see /etc/bonsai/devrule)\n\
             -SUBSYSTEM=block;DEVTYPE=disk;vd.* 0:6 660 */etc/bonsai/devrule 0\n\
             -$MODALIAS=.* 0:0 600 ! @modprobe -q \"$MODALIAS\"\n"
        );
        let mut with_attrs = disk_rule();
        with_attrs.attrs.insert("size".into(), "65536".into());
        let d = validate(&[with_attrs], &resolve, &[], &all)
            .unwrap()
            .unwrap();
        assert!(!d.modprobe);
        let conf = mdev_conf(&d);
        assert!(
            conf.contains("-SUBSYSTEM=block;DEVTYPE=disk;vd.* 0:0 600 ! */etc/bonsai/devrule 0\n"),
            "{conf}"
        );
        let script = devrule_script(&d);
        assert!(
            script.contains("[ \"$(cat \"/sys$DEVPATH/size\" 2>/dev/null)\" = '65536' ] || exit 0"),
            "{script}"
        );
        assert!(
            script.contains("chown 0:6 \"/dev/$DEVNAME\" && chmod 660"),
            "{script}"
        );
        assert!(
            script.contains("ln -sfn \"../../$DEVNAME\" \"$l\""),
            "{script}"
        );
        assert!(script.contains("ln -sfn \"$DEVNAME\" \"$l\""), "{script}");
    }

    #[test]
    fn rendered_scripts_are_valid_shell() {
        let d = validate(&[disk_rule()], &resolve, &[], &all)
            .unwrap()
            .unwrap();
        for (name, text) in [
            ("devrule", devrule_script(&d)),
            ("uevent", UEVENT_SCRIPT.to_string()),
            ("settle", SETTLE.to_string()),
            ("devices", DEVICES.to_string()),
        ] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &text])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn bad_rules_are_named() {
        let err = |s: DeviceRuleSpec, modules: &[String]| {
            validate(&[s], &resolve, modules, &all).unwrap_err()
        };
        assert_eq!(
            err(DeviceRuleSpec { mode: Some("0660".into()), ..Default::default() }, &[]),
            "device-rules[0]: matches every event; give subsystem, kernel, devtype, attrs or modalias"
        );
        let mut s = disk_rule();
        s.kernel = Some("vd[ab]".into());
        assert!(err(s, &[]).starts_with("device-rules[0].kernel: 'vd[ab]' is not a glob"));
        let mut s = disk_rule();
        s.mode = Some("rw".into());
        assert_eq!(
            err(s, &[]),
            "device-rules[0].mode: 'rw' is not an octal mode"
        );
        let mut s = disk_rule();
        s.owner = Some("nobody".into());
        assert_eq!(err(s, &[]), "device-rules[0].owner: unknown user 'nobody'");
        let mut s = disk_rule();
        s.symlinks = vec!["../etc/passwd".into()];
        assert!(err(s, &[])
            .starts_with("device-rules[0].symlinks: '../etc/passwd' is not a path under /dev"));
        let mut s = disk_rule();
        s.load_module = Some("virtio_console".into());
        assert_eq!(
            err(s, &["virtio_balloon".into()]),
            "device-rules[0].load-module: 'virtio_console' is not in kernel.modules"
        );
        let mut s = disk_rule();
        s.attrs.insert("../x".into(), "1".into());
        assert_eq!(
            err(s, &[]),
            "device-rules[0].attrs: '../x' is not a sysfs attribute name"
        );
        let no_mdev = validate(&[disk_rule()], &resolve, &[], &|p| p != "mdev").unwrap_err();
        assert_eq!(
            no_mdev,
            "device-rules: applying device rules needs busybox mdev, which the image does not have"
        );
        assert_eq!(validate(&[], &resolve, &[], &all), Ok(None));
    }
}
