//! Verification of a finished tree: no dangling store references, no surprising modes.
//!
//! Every file (host-sourced or generated) and every symlink target is scanned for
//! `/nix/store/<hash>…`; a hash that names no store path in the image (no entry
//! `/nix/store/<hash>-…` at the top of the store) is a problem `file: refers to …, which is
//! not in the image`. Setuid/setgid bits on files and directories, and world-writable files
//! and directories (directories with the sticky bit, like `/tmp`, are fine; device nodes and
//! symlinks are not checked) are problems unless the policy allows the path. All problems
//! are returned, sorted, in one [`Error::Problems`].

use std::collections::BTreeSet;
use std::fs;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::{GlobSet, Policy};
use crate::refs;
use crate::select::{Problem, ProblemKind};
use crate::tree::{NodeKind, Source, Tree};

/// What [`verify`] looked at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Files and symlinks scanned.
    pub scanned: u64,
    /// Store references found (all of them resolving to store paths in the image).
    pub references: u64,
}

/// Checks `tree` as described in the module docs.
pub fn verify(tree: &Tree, policy: &Policy) -> Result<VerifyReport> {
    let allow_dangling = GlobSet::new("allow-dangling", &policy.allow_dangling)?;
    let allow_setuid = GlobSet::new("allow-setuid", &policy.allow_setuid)?;
    let allow_world_writable = GlobSet::new("allow-world-writable", &policy.allow_world_writable)?;

    let mut present = BTreeSet::new();
    for (path, _) in tree {
        let mut comps = path.components();
        if let (Some("nix"), Some("store"), Some(base), None) =
            (comps.next(), comps.next(), comps.next(), comps.next())
        {
            if let Some(hash) = refs::hash_of(&format!("/nix/store/{base}")) {
                present.insert(hash.to_owned());
            }
        }
    }

    let mut report = VerifyReport::default();
    let mut problems = Vec::new();
    for (path, node) in tree {
        let abs = path.to_absolute();
        let data: Option<std::borrow::Cow<'_, [u8]>> = match &node.kind {
            NodeKind::File {
                source: Source::Bytes(bytes),
            } => Some(bytes.as_slice().into()),
            NodeKind::File {
                source: Source::Host(host),
            } => Some(
                fs::read(host)
                    .map_err(|e| Error::io("reading", host, e))?
                    .into(),
            ),
            NodeKind::Symlink { target } => Some(target.as_bytes().into()),
            _ => None,
        };
        if let Some(data) = data {
            report.scanned += 1;
            let mut seen = BTreeSet::new();
            for r in refs::scan(&data) {
                report.references += 1;
                if present.contains(&r.hash) || !seen.insert(r.hash.clone()) {
                    continue;
                }
                let missing = r.store_path();
                if allow_dangling.matches(&abs) || allow_dangling.matches(&missing) {
                    continue;
                }
                problems.push(Problem {
                    file: abs.clone(),
                    kind: ProblemKind::DanglingReference { missing },
                });
            }
        }
        let checked = matches!(node.kind, NodeKind::File { .. } | NodeKind::Dir);
        if checked && node.mode & 0o6000 != 0 && !allow_setuid.matches(&abs) {
            problems.push(Problem {
                file: abs.clone(),
                kind: ProblemKind::Setuid { mode: node.mode },
            });
        }
        let world_writable = node.mode & 0o002 != 0 && !(node.is_dir() && node.mode & 0o1000 != 0);
        if checked && world_writable && !allow_world_writable.matches(&abs) {
            problems.push(Problem {
                file: abs,
                kind: ProblemKind::WorldWritable { mode: node.mode },
            });
        }
    }
    problems.sort();
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(Error::Problems {
            step: "verify",
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Node;

    const A: &str = "nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-a";
    const B: &str = "/nix/store/b57wb6gvigvq5sf1s6j6l3gqxrdh9iyd-b";
    const C: &str = "/nix/store/1b1cxclgha0xgw9nmcmvcjacy168gp32-c";

    fn bytes(data: String, mode: u32) -> Node {
        Node::file(Source::Bytes(data.into_bytes()), mode)
    }

    #[test]
    fn lists_every_dangling_reference_sorted() {
        let mut tree = Tree::new();
        tree.insert(
            format!("{A}/bin/x"),
            bytes(format!("{C}/lib {B}/bin {B}"), 0o755),
        )
        .unwrap();
        tree.insert(format!("{A}/lib/y"), Node::symlink(format!("{B}/y")))
            .unwrap();
        tree.insert(format!("{A}/share/ok"), bytes(format!("/{A}/share"), 0o644))
            .unwrap();
        let err = verify(&tree, &Policy::default()).unwrap_err();
        let Error::Problems { step, problems } = err else {
            panic!()
        };
        assert_eq!(step, "verify");
        let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            lines,
            [
                format!("/{A}/bin/x: refers to {C}, which is not in the image"),
                format!("/{A}/bin/x: refers to {B}, which is not in the image"),
                format!("/{A}/lib/y: refers to {B}, which is not in the image"),
            ]
        );
        let policy = Policy {
            allow_dangling: vec![format!("{B}"), format!("/{A}/bin/x")],
            ..Policy::default()
        };
        verify(&tree, &policy).unwrap();
    }

    #[test]
    fn modes_are_checked_unless_allowed() {
        let mut tree = Tree::new();
        tree.insert("bin/su", bytes(String::new(), 0o4755)).unwrap();
        tree.insert("etc/x", bytes(String::new(), 0o666)).unwrap();
        tree.insert("tmp", Node::dir(0o1777)).unwrap();
        tree.insert("dev/null", Node::char_dev(1, 3, 0o666))
            .unwrap();
        tree.insert("var", Node::dir(0o777)).unwrap();
        let err = verify(&tree, &Policy::default()).unwrap_err().to_string();
        assert!(
            err.contains("/bin/su: mode 4755 has setuid/setgid bits"),
            "{err}"
        );
        assert!(err.contains("/etc/x: mode 0666 is world-writable"), "{err}");
        assert!(err.contains("/var: mode 0777 is world-writable"), "{err}");
        assert!(!err.contains("/tmp"), "{err}");
        assert!(!err.contains("/dev/null"), "{err}");
        let policy = Policy {
            allow_setuid: vec!["/bin/su".into()],
            allow_world_writable: vec!["/etc/x".into(), "/var".into()],
            ..Policy::default()
        };
        verify(&tree, &policy).unwrap();
    }
}
