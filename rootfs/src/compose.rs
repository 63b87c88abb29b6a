//! Compose: the files bonsai adds around the store paths: `/init`, `/bin` links into the store,
//! `/etc` basics, the console device, and the check runner that speaks the console protocol
//! of the `qemu` crate (`BONSAI-READY`, `BONSAI-CHECK-BEGIN/END`, `BONSAI-DONE`).
//!
//! The init backends (runit, s6, busybox init, bonsai-init) plug in here: each renders its
//! own tree; the busybox `/init` script below is the default.

use crate::error::Result;
use crate::tree::{Node, Source, Tree};

/// What the compose step needs to know; all paths are store paths, never host paths.
#[derive(Debug, Clone)]
pub struct ComposeSpec {
    /// Store path of the busybox package providing `sh` and the applets the init uses.
    pub busybox: String,
    /// Programs for `/bin`: (name, absolute target in the store). The first of a name wins.
    pub bin_links: Vec<(String, String)>,
    pub hostname: String,
    /// Board and profile names, for /etc/os-release.
    pub board: String,
    pub profile: String,
    /// Checks for `boot --check`, in order: (name, shell command).
    pub checks: Vec<(String, String)>,
}

const CHECK_RUNNER: &str = r#"#!/bin/sh
# Runs the board's checks and reports them on the console (see the qemu crate's protocol).
nonce=$1
i=0
for f in /etc/bonsai/checks/*; do
	i=$((i + 1))
	printf 'BONSAI-CHECK-BEGIN %s %d\n' "$nonce" "$i"
	out=$(cd / && sh "$f" </dev/null 2>&1)
	rc=$?
	[ -n "$out" ] && printf '%s\n' "$out"
	printf 'BONSAI-CHECK-END %s %d %d\n' "$nonce" "$i" "$rc"
done
"#;

fn init_script() -> String {
    r#"#!/bin/sh
# bonsai's default /init (busybox): mount, set up, report ready; run checks or give a shell.
export PATH=/bin HOME=/root
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
nonce=
check=
for w in $(cat /proc/cmdline); do
	case "$w" in
	bonsai.nonce=*) nonce=${w#bonsai.nonce=} ;;
	bonsai.check=1) check=1 ;;
	esac
done
read -r up _ </proc/uptime
printf 'BONSAI-READY %s %s\n' "${nonce:-none}" "$up"
if [ -n "$check" ]; then
	echo 1 >/proc/sys/kernel/printk
	/etc/bonsai/run-checks "$nonce"
	printf 'BONSAI-DONE %s\n' "$nonce"
	sync
	reboot -f
fi
echo "bonsai: $(cat /etc/hostname) is up; exit the shell to power off"
setsid cttyhack sh -l
sync
reboot -f
"#
    .to_string()
}

fn file(bytes: impl Into<Vec<u8>>, mode: u32) -> Node {
    Node::file(Source::Bytes(bytes.into()), mode)
}

/// Adds bonsai's own files to `tree` (which already holds the store paths).
pub fn compose(tree: &mut Tree, spec: &ComposeSpec) -> Result<()> {
    for d in ["proc", "sys", "dev", "run", "etc/bonsai/checks"] {
        tree.insert(d, Node::dir(0o755))?;
    }
    tree.insert("tmp", Node::dir(0o1777))?;
    tree.insert("root", Node::dir(0o700))?;
    tree.insert("dev/console", Node::char_dev(5, 1, 0o600))?;
    tree.insert("dev/null", Node::char_dev(1, 3, 0o666))?;

    // /bin holds links into the store; the other usual places point at it.
    tree.insert("bin", Node::dir(0o755))?;
    let mut seen = std::collections::BTreeSet::new();
    for (name, target) in &spec.bin_links {
        if seen.insert(name.clone()) {
            tree.insert(format!("bin/{name}"), Node::symlink(target.clone()))?;
        }
    }
    if !seen.contains("sh") {
        tree.insert("bin/sh", Node::symlink(format!("{}/bin/sh", spec.busybox)))?;
    }
    tree.insert("sbin", Node::symlink("bin"))?;
    tree.insert("usr/bin", Node::symlink("../bin"))?;
    tree.insert("usr/sbin", Node::symlink("../bin"))?;

    tree.insert("init", file(init_script(), 0o755))?;
    tree.insert("etc/bonsai/run-checks", file(CHECK_RUNNER, 0o755))?;
    for (i, (name, run)) in spec.checks.iter().enumerate() {
        let body = format!("# {}\n{}\n", name.replace('\n', " "), run);
        tree.insert(format!("etc/bonsai/checks/{:03}", i + 1), file(body, 0o644))?;
    }

    tree.insert("etc/hostname", file(format!("{}\n", spec.hostname), 0o644))?;
    tree.insert(
        "etc/hosts",
        file(
            format!(
                "127.0.0.1 localhost {h}\n::1 localhost {h}\n",
                h = spec.hostname
            ),
            0o644,
        ),
    )?;
    tree.insert("etc/passwd", file("root:x:0:0:root:/root:/bin/sh\n", 0o644))?;
    tree.insert("etc/group", file("root:x:0:\ntty:x:5:\n", 0o644))?;
    // A locked root password: a console shell needs none, and nothing can log in remotely.
    tree.insert("etc/shadow", file("root:*:1::::::\n", 0o600))?;
    tree.insert(
        "etc/profile",
        file("export PATH=/bin\nexport PS1='\\h:\\w\\$ '\n", 0o644),
    )?;
    tree.insert(
        "etc/os-release",
        file(
            format!(
                "NAME=bonsai\nID=bonsai\nVARIANT_ID={}\nBONSAI_BOARD={}\nBONSAI_PROFILE={}\n",
                spec.profile, spec.board, spec.profile
            ),
            0o644,
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::NodeKind;

    fn spec() -> ComposeSpec {
        ComposeSpec {
            busybox: "/nix/store/00000000000000000000000000000000-busybox".into(),
            bin_links: vec![
                (
                    "sh".into(),
                    "/nix/store/00000000000000000000000000000000-busybox/bin/sh".into(),
                ),
                (
                    "sh".into(),
                    "/nix/store/11111111111111111111111111111111-other/bin/sh".into(),
                ),
            ],
            hostname: "qemu".into(),
            board: "b".into(),
            profile: "p".into(),
            checks: vec![
                ("one".into(), "uname -m".into()),
                ("two".into(), "echo hi".into()),
            ],
        }
    }

    #[test]
    fn composes_init_links_and_checks() {
        let mut t = Tree::new();
        compose(&mut t, &spec()).unwrap();
        let init = t.get("init").unwrap();
        assert_eq!(init.mode, 0o755);
        match &t.get("bin/sh").unwrap().kind {
            NodeKind::Symlink { target } => {
                assert!(target.contains("0000-busybox"), "first link wins")
            }
            k => panic!("{k:?}"),
        }
        assert!(matches!(
            t.get("dev/console").unwrap().kind,
            NodeKind::CharDev { major: 5, minor: 1 }
        ));
        assert!(t.contains("etc/bonsai/checks/001"));
        assert!(t.contains("etc/bonsai/checks/002"));
        assert_eq!(t.get("tmp").unwrap().mode, 0o1777);
    }
}
