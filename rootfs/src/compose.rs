//! Compose: the files bonsai adds around the store paths: `/init`, `/bin` links into the store,
//! `/etc` basics, the console device, and the check runner that speaks the console protocol
//! of the `qemu` crate (`BONSAI-READY`, `BONSAI-CHECK-BEGIN/END`, `BONSAI-DONE`).
//!
//! The init backends (runit, s6, busybox init, bonsai-init) plug in here: each renders its
//! own tree; the busybox `/init` script below is the default.

use crate::backends::InitInputs;
use crate::error::Result;
use crate::system::System;
use crate::tree::{Node, Source, Tree};

/// What the compose step needs to know; all paths are store paths, never host paths.
#[derive(Debug, Clone)]
pub struct ComposeSpec {
    /// Programs for `/bin`: (name, absolute target in the store). The first of a name wins.
    pub bin_links: Vec<(String, String)>,
    /// Board and profile names, for /etc/os-release.
    pub board: String,
    pub profile: String,
    /// Checks for `boot --check`, in order: (name, shell command).
    pub checks: Vec<(String, String)>,
    /// The validated service description.
    pub system: System,
    /// The init backend and what it renders against.
    pub init: InitInputs,
}

const CHECK_RUNNER: &str = r#"#!/bin/sh
# Runs the board's checks and reports them on the console (see the qemu crate's protocol).
nonce=$1
# for /etc/bonsai/host, through which a check asks the host to act on the machine
export BONSAI_NONCE=$nonce
i=0
for f in /etc/bonsai/checks/*; do
	i=$((i + 1))
	out=$(cd / && sh "$f" </dev/null 2>&1)
	rc=$?
	[ -n "$out" ] && out="$out
"
	# One write, so that other writers to the console cannot land inside a check's output.
	printf 'BONSAI-CHECK-BEGIN %s %d\n%sBONSAI-CHECK-END %s %d %d\n' "$nonce" "$i" "$out" "$nonce" "$i" "$rc"
done
"#;

/// `/etc/bonsai/host qmp <command> [<json>]`: a check's request to the host (the qemu crate's
/// protocol, `BONSAI-HOST`), straight to the console: the check's own output is printed only
/// when it ends.
const HOST_REQUEST: &str = r#"#!/bin/sh
# asks the host to run a QMP command on this machine (hotplug); only while checks run
[ -n "$BONSAI_NONCE" ] || { echo "bonsai-host: not in a check run" >&2; exit 2; }
printf 'BONSAI-HOST %s %s\n' "$BONSAI_NONCE" "$*" >/dev/console
"#;

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
    // The backend may put its own programs in /bin (shutdown wrappers, bonsai-init): rendered
    // once, aside, so that its names win over the packages' links.
    let mut backend_tree = Tree::new();
    crate::backends::render(&mut backend_tree, &spec.system, &spec.init)?;
    for (path, _) in backend_tree.iter() {
        if let Some(name) = path.as_str().strip_prefix("bin/") {
            seen.insert(name.to_string());
        }
    }
    for (name, target) in &spec.bin_links {
        if seen.insert(name.clone()) {
            tree.insert(format!("bin/{name}"), Node::symlink(target.clone()))?;
        }
    }
    if !seen.contains("sh") {
        tree.insert(
            "bin/sh",
            Node::symlink(format!("{}/bin/sh", spec.init.busybox)),
        )?;
    }
    tree.insert("sbin", Node::symlink("bin"))?;
    tree.insert("usr/bin", Node::symlink("../bin"))?;
    tree.insert("usr/sbin", Node::symlink("../bin"))?;

    tree.merge(&backend_tree)?;
    tree.insert("etc/bonsai/run-checks", file(CHECK_RUNNER, 0o755))?;
    tree.insert("etc/bonsai/host", file(HOST_REQUEST, 0o755))?;
    for (i, (name, run)) in spec.checks.iter().enumerate() {
        let body = format!("# {}\n{}\n", name.replace('\n', " "), run);
        tree.insert(format!("etc/bonsai/checks/{:03}", i + 1), file(body, 0o644))?;
    }

    let sys = &spec.system;
    tree.insert("etc/hostname", file(format!("{}\n", sys.hostname), 0o644))?;
    tree.insert(
        "etc/hosts",
        file(
            format!(
                "127.0.0.1 localhost {h}\n::1 localhost {h}\n",
                h = sys.hostname
            ),
            0o644,
        ),
    )?;
    let mut passwd = String::new();
    let mut shadow = String::new();
    for u in &sys.users {
        passwd.push_str(&format!(
            "{}:x:{}:{}:{}:{}:{}\n",
            u.name, u.uid, u.gid, u.name, u.home, u.shell
        ));
        // Locked by default: a console shell needs none; SSH logs in with keys.
        shadow.push_str(&format!(
            "{}:{}:1::::::\n",
            u.name,
            u.password.shadow_field()
        ));
    }
    let mut group = String::new();
    for (name, gid) in &sys.groups {
        group.push_str(&format!("{name}:x:{gid}:\n"));
    }
    tree.insert("etc/passwd", file(passwd, 0o644))?;
    tree.insert("etc/group", file(group, 0o644))?;
    tree.insert("etc/shadow", file(shadow, 0o600))?;
    tree.insert(
        "etc/profile",
        file("export PATH=/bin\nexport PS1='\\h:\\w\\$ '\n", 0o644),
    )?;
    tree.insert(
        "etc/os-release",
        file(
            format!(
                "NAME=bonsai\nID=bonsai\nVARIANT_ID={}\nBONSAI_BOARD={}\nBONSAI_PROFILE={}\nBONSAI_INIT={}\n",
                spec.profile,
                spec.board,
                spec.profile,
                spec.init.backend.name()
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
        let system =
            crate::system::validate(&crate::system::SystemSpec::default(), "qemu", &|_| true)
                .unwrap();
        ComposeSpec {
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
            board: "b".into(),
            profile: "p".into(),
            checks: vec![
                ("one".into(), "uname -m".into()),
                ("two".into(), "echo hi".into()),
            ],
            system,
            init: InitInputs {
                backend: crate::backends::Backend::Busybox,
                busybox: "/nix/store/00000000000000000000000000000000-busybox".into(),
                runit: None,
                s6: None,
                bonsai_init: None,
                faults: Vec::new(),
            },
        }
    }

    #[test]
    fn composes_init_links_and_checks() {
        let mut t = Tree::new();
        compose(&mut t, &spec()).unwrap();
        assert!(
            matches!(&t.get("init").unwrap().kind, NodeKind::Symlink { target } if target.ends_with("busybox/bin/busybox"))
        );
        assert!(t.contains("etc/inittab"));
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
