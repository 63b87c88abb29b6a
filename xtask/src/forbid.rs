//! `[image] forbid`: globs on store path names that an image must never contain, and the
//! chains that explain how a store path got in. A kept file that comes from, or refers to, a
//! matching store path fails the build with every chain into it, from a root (a package's
//! program, bonsai's generated files); a match that is only in the Nix closure, with nothing
//! kept from it, is a warning with the chain of store references from a package. `cargo xtask
//! why --board <b> <glob>` prints the same chains.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rootfs::Glob;

use crate::build::Assembly;

/// A store path's name: `/nix/store/<hash>-glibc-2.36-9` -> `glibc-2.36-9`.
pub fn name_of(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// The package name of a store path name, as Nix's `builtins.parseDrvName` splits it: up to
/// the first `-` that is not followed by a letter (`glibc-2.36-9` -> `glibc`,
/// `busybox-static-1.35.0` -> `busybox-static`).
pub fn pname(name: &str) -> &str {
    let bytes = name.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return &name[..i];
        }
    }
    name
}

/// Whether `glob` matches the store path's name or its package name (so `systemd` matches
/// `systemd-257` and `openssl*` matches `openssl-3.0.15-bin`).
pub fn matches(glob: &Glob, store_path: &str) -> bool {
    let name = name_of(store_path);
    glob.matches(name) || glob.matches(pname(name))
}

/// Checks a `forbid` list: each entry a glob on names, without `/`. Errors name the entry.
pub fn parse(patterns: &[String]) -> Result<Vec<Glob>, String> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.contains('/') || p.is_empty() {
                return Err(format!(
                    "forbid[{i}]: {p:?} is not a store path name glob (like \"systemd\" or \"openssl*\", without '/')"
                ));
            }
            Glob::new(p).map_err(|e| format!("forbid[{i}]: {e}"))
        })
        .collect()
}

/// `/nix/store/<hash>-name/rest` shown as `…-name/rest`.
pub fn short(path: &str) -> String {
    match path.strip_prefix("/nix/store/") {
        Some(rest) if rest.len() > 33 && rest.as_bytes()[32] == b'-' => format!("…{}", &rest[32..]),
        _ => path.to_string(),
    }
}

fn store_path_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/nix/store/")?;
    let end = rest.find('/').map(|i| i + 11).unwrap_or(path.len());
    Some(&path[..end])
}

fn is_structural(how: &str) -> bool {
    how == "in directory" || how == "parent directory"
}

/// The chain from a root to `path` along the first reason of each entry: (entry, how),
/// root first.
fn first_chain(a: &Assembly, path: &str) -> Vec<(String, String)> {
    let mut chain = Vec::new();
    let mut seen = BTreeSet::new();
    let mut cur = path.to_string();
    while let Some((from, how)) = a.reasons.get(&cur) {
        chain.push((cur.clone(), how.clone()));
        if !seen.insert(cur.clone()) {
            break;
        }
        match from {
            Some(f) => cur = f.clone(),
            None => break,
        }
    }
    chain.reverse();
    chain
}

/// One line for a chain: `[package hello] /bin/hello → …-hello/bin/hello → (DT_NEEDED
/// libc.so.6) …-glibc/lib/libc.so.6`; steps into a directory's files are folded into the file,
/// and a program the image links in `/bin` starts with that link (`programs`).
pub fn render(chain: &[(String, String)], programs: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut last: Option<String> = None;
    let mut first = true;
    let mut flush = |out: &mut String, full: &str| {
        if std::mem::take(&mut first) {
            if let Some(link) = programs.get(full) {
                out.push_str(&format!("{link} → "));
            }
        }
        out.push_str(&short(full));
    };
    for (i, (path, how)) in chain.iter().enumerate() {
        if i == 0 {
            let label = how.strip_prefix("root: ").unwrap_or(how);
            out.push_str(&format!("[{label}] "));
        } else if !is_structural(how) {
            if let Some(l) = last.take() {
                flush(&mut out, &l);
            }
            out.push_str(&format!(" → ({how}) "));
        }
        last = Some(path.clone());
    }
    if let Some(l) = last {
        flush(&mut out, &l);
    }
    out
}

/// Every chain into the kept store path `sp`: for each of its entries that a root, or an
/// entry of another store path, refers to, the chain to that referrer plus the step in.
/// Chains are sorted and without duplicates.
pub fn chains_into(a: &Assembly, sp: &str) -> Vec<String> {
    let prefix = format!("{sp}/");
    let inside = |p: &str| p == sp || p.starts_with(&prefix);
    let mut out = BTreeSet::new();
    let entries = a.reasons.iter().filter(|(p, _)| inside(p));
    for (path, (from, how)) in entries {
        let mut reasons = vec![(from.clone(), how.clone())];
        reasons.extend(a.also.get(path).cloned().unwrap_or_default());
        for (from, how) in reasons {
            let chain = match &from {
                None => vec![(path.clone(), how.clone())],
                Some(f) if !inside(f) => {
                    let mut c = first_chain(a, f);
                    c.push((path.clone(), how.clone()));
                    c
                }
                Some(_) => continue,
            };
            out.insert(render(&chain, &a.programs));
        }
    }
    // Files that refer to it but whose references were rewritten away.
    for (file, targets) in &a.rewritten {
        if targets.iter().any(|t| t == sp) && !inside(file) {
            let mut c = first_chain(a, file);
            c.push((sp.to_string(), "refers to".into()));
            out.insert(render(&c, &a.programs));
        }
    }
    out.into_iter().collect()
}

/// The shortest chain of store references from a package's store path to `sp`, rendered
/// `[package hello] …-hello-1.0 → …-glibc-2.36`.
pub fn closure_chain(a: &Assembly, sp: &str) -> Option<String> {
    let mut prev: BTreeMap<&str, Option<&str>> = BTreeMap::new();
    let mut queue = VecDeque::new();
    for (_, p) in &a.packages {
        if prev.insert(p, None).is_none() {
            queue.push_back(p.as_str());
        }
    }
    while let Some(cur) = queue.pop_front() {
        if cur == sp {
            let mut path = vec![cur];
            let mut at = cur;
            while let Some(Some(p)) = prev.get(at) {
                path.push(p);
                at = p;
            }
            path.reverse();
            let root = path[0];
            let attr = a
                .packages
                .iter()
                .find(|(_, p)| p == root)
                .map(|(attr, _)| attr.as_str())
                .unwrap_or("?");
            let steps: Vec<String> = path.iter().map(|p| short(p)).collect();
            return Some(format!("[package {attr}] {}", steps.join(" → ")));
        }
        for r in a.references.get(cur).into_iter().flatten() {
            if !prev.contains_key(r.as_str()) {
                prev.insert(r, Some(cur));
                queue.push_back(r);
            }
        }
    }
    None
}

/// A store path a pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub pattern: String,
    pub store_path: String,
    /// Entries of it in the image (0: only in the closure), its parent folders not counted.
    pub kept_files: usize,
    /// Chains into it: from roots when kept or referred to, else of store references.
    pub chains: Vec<String>,
    /// Whether it fails the build: something kept comes from or refers to it.
    pub in_image: bool,
}

/// Every store path of the image or its closure that matches one of `globs`.
pub fn findings(globs: &[Glob], a: &Assembly) -> Vec<Finding> {
    let mut store_paths: BTreeSet<&str> =
        a.reasons.keys().filter_map(|p| store_path_of(p)).collect();
    store_paths.extend(a.vanished.iter().map(String::as_str));
    store_paths.extend(a.references.keys().map(String::as_str));
    store_paths.extend(a.references.values().flatten().map(String::as_str));
    let mut out = Vec::new();
    for sp in store_paths {
        let Some(g) = globs.iter().find(|g| matches(g, sp)) else {
            continue;
        };
        let prefix = format!("{sp}/");
        let under: Vec<&String> = a
            .reasons
            .iter()
            .filter(|(p, _)| p.as_str() == sp || p.starts_with(&prefix))
            .filter(|(_, (_, how))| how != "parent directory")
            .map(|(p, _)| p)
            .collect();
        let kept_files = under.len();
        let kept = kept_files > 0 || a.reasons.contains_key(sp);
        let referred = a.rewritten.values().flatten().any(|t| t == sp);
        let in_image = kept || referred;
        let chains = if in_image {
            chains_into(a, sp)
        } else {
            closure_chain(a, sp).into_iter().collect()
        };
        out.push(Finding {
            pattern: g.as_str().to_string(),
            store_path: sp.to_string(),
            kept_files,
            chains,
            in_image,
        });
    }
    out
}

/// The build's verdict on `[image] forbid`: an error holding every store path of the image
/// that a pattern matches, with its chains; warnings for matches only in the closure.
pub fn check(profile: &str, patterns: &[String], a: &Assembly) -> anyhow::Result<Vec<String>> {
    let globs = parse(patterns).map_err(|e| anyhow::anyhow!("profile {profile}: [image]: {e}"))?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for f in findings(&globs, a) {
        let name = name_of(&f.store_path);
        if f.in_image {
            errors.push(format!(
                "{:?} matches {name}, which the image keeps ({} entries), through:",
                f.pattern, f.kept_files
            ));
            errors.extend(f.chains.iter().map(|c| format!("    {c}")));
        } else {
            let chain = f
                .chains
                .first()
                .map(String::as_str)
                .unwrap_or("no chain from a package");
            warnings.push(format!(
                "profile {profile} forbids {:?}: {name} is in the Nix closure but nothing of it is in the image: {chain}",
                f.pattern
            ));
        }
    }
    if !errors.is_empty() {
        anyhow::bail!(
            "profile {profile}: [image] forbid: the image contains what the profile forbids: {}",
            errors.join("\n  ")
        );
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BB: &str = "/nix/store/lxyh9kq1cgmgqy1m0448x0xckfa8d79m-busybox-1.35.0";
    const HELLO: &str = "/nix/store/dd1xvaxx4a1dspzykmi45sjg5759yis0-hello-1.0";
    const GLIBC: &str = "/nix/store/fwprlxc9sv7gr0k3vvccd6fs8jgj6n6g-glibc-2.36-9";
    const SRC: &str = "/nix/store/zrnsasl4vd9ma8vvj7pfs87qfbswslaa-systemd-257";

    fn reason(from: Option<&str>, how: &str) -> (Option<String>, String) {
        (from.map(String::from), how.to_string())
    }

    /// busybox and hello both need glibc's libc.so.6; systemd is only in the closure.
    fn assembly() -> Assembly {
        let mut a = Assembly::default();
        let r = &mut a.reasons;
        r.insert(format!("{BB}/bin"), reason(None, "root: package busybox"));
        r.insert(
            format!("{BB}/bin/busybox"),
            reason(Some(&format!("{BB}/bin")), "in directory"),
        );
        r.insert(format!("{HELLO}/bin"), reason(None, "root: package hello"));
        r.insert(
            format!("{HELLO}/bin/hello"),
            reason(Some(&format!("{HELLO}/bin")), "in directory"),
        );
        r.insert(
            GLIBC.into(),
            reason(Some(&format!("{GLIBC}/lib")), "parent directory"),
        );
        r.insert(
            format!("{GLIBC}/lib"),
            reason(Some(&format!("{GLIBC}/lib/libc.so.6")), "parent directory"),
        );
        r.insert(
            format!("{GLIBC}/lib/libc.so.6"),
            reason(Some(&format!("{BB}/bin/busybox")), "DT_NEEDED libc.so.6"),
        );
        a.also.insert(
            format!("{GLIBC}/lib/libc.so.6"),
            vec![reason(
                Some(&format!("{HELLO}/bin/hello")),
                "DT_NEEDED libc.so.6",
            )],
        );
        a.vanished.push(SRC.into());
        a.references
            .insert(HELLO.into(), vec![GLIBC.into(), SRC.into()]);
        a.references.insert(BB.into(), vec![GLIBC.into()]);
        a.packages = vec![
            ("busybox".into(), BB.into()),
            ("hello".into(), HELLO.into()),
        ];
        a.programs
            .insert(format!("{HELLO}/bin/hello"), "/bin/hello".into());
        a
    }

    #[test]
    fn names_and_package_names() {
        assert_eq!(name_of(GLIBC), "glibc-2.36-9");
        assert_eq!(pname("glibc-2.36-9"), "glibc");
        assert_eq!(pname("busybox-static-1.35.0-4+deb12u1"), "busybox-static");
        assert_eq!(pname("linux-config-6.1.192"), "linux-config");
        assert_eq!(pname("src"), "src");
        let g = Glob::new("systemd").unwrap();
        assert!(matches(&g, SRC));
        assert!(!matches(&g, GLIBC));
        assert!(matches(&Glob::new("glibc*").unwrap(), GLIBC));
        assert!(parse(&["lib/x".into()])
            .unwrap_err()
            .starts_with("forbid[0]: "));
    }

    #[test]
    fn a_kept_match_fails_with_every_chain() {
        let a = assembly();
        let err = check("t", &["glibc*".into()], &a).unwrap_err().to_string();
        assert!(err.starts_with("profile t: [image] forbid: "), "{err}");
        assert!(
            err.contains("\"glibc*\" matches glibc-2.36-9, which the image keeps (1 entries)"),
            "{err}"
        );
        assert!(
            err.contains("[package hello] /bin/hello → …-hello-1.0/bin/hello → (DT_NEEDED libc.so.6) …-glibc-2.36-9/lib/libc.so.6"),
            "{err}"
        );
        assert!(
            err.contains("[package busybox] …-busybox-1.35.0/bin/busybox → (DT_NEEDED libc.so.6) …-glibc-2.36-9/lib/libc.so.6"),
            "{err}"
        );
    }

    #[test]
    fn a_closure_only_match_warns_with_the_reference_chain() {
        let a = assembly();
        let w = check("t", &["systemd".into(), "openssl*".into()], &a).unwrap();
        assert_eq!(
            w,
            vec!["profile t forbids \"systemd\": systemd-257 is in the Nix closure but nothing of it is in the image: [package hello] …-hello-1.0 → …-systemd-257".to_string()]
        );
        assert!(check("t", &["openssl*".into()], &a).unwrap().is_empty());
    }

    #[test]
    fn a_rewritten_reference_counts_as_in_the_image() {
        let mut a = assembly();
        a.rewritten
            .insert(format!("{HELLO}/bin/hello"), vec![SRC.into()]);
        let err = check("t", &["systemd".into()], &a).unwrap_err().to_string();
        assert!(
            err.contains(
                "[package hello] /bin/hello → …-hello-1.0/bin/hello → (refers to) …-systemd-257"
            ),
            "{err}"
        );
    }
}
