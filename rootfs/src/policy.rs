//! The image policy: what to keep, prune, drop and allow, and how to strip. Profiles embed it
//! as their `[image]` table; [`Policy::merge`] layers a child profile's table on its parent's.
//!
//! Globs ([`Glob`]) are small: `*` and `?` within one path component, `**` for any number of
//! components (zero included). A pattern that starts with `/` matches whole absolute paths
//! (`/nix/store/*-glibc-*/lib/gconv/UTF-16.so`); a pattern without any `/` matches the last
//! component only (`*.pyc`, `libbar.so.1`, `*-linux-*`).

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The `[image]` table of a profile. Every key is optional.
///
/// Lists (`keep`, `keep-locales`, `prune-globs`, `drop`, `allow-*`, …) are *appended* when a
/// child profile is merged onto its parent ([`Policy::merge`]); scalars (`dlopen`, `strip`,
/// `strip-modules`) are overridden by the child. Prune classes are all on by default:
/// `keep-classes = ["locales"]` turns a class off (its files are kept like any other), and a
/// child profile can turn it back on with `prune-classes = ["locales"]` (merge removes the
/// class from the parent's `keep-classes`; within one table a class may not be in both).
///
/// ```toml
/// [image]
/// keep = ["/nix/store/*-glibc-*/lib/gconv/UTF-16.so"]
/// keep-classes = ["terminfo"]          # keep every terminfo entry
/// keep-locales = ["en_US.UTF-8"]       # C.UTF-8 is always kept
/// keep-gconv = ["UTF-16", "UTF-32"]
/// prune-globs = ["/nix/store/*-busybox-*/share/initramfs-tools/**", "*.pyc"]
/// drop = ["*-linux-headers-*", { path = "/nix/store/*-gcc-*-lib", rewrite = true }]
/// allow-missing = ["libgcc_s.so.1"]
/// allow-dangling = ["/nix/store/*-hello.c"]
/// allow-setuid = ["/nix/store/*-busybox-*/bin/busybox"]
/// allow-world-writable = []
/// allow-private-keys = ["/nix/store/*-openssl-*/share/test/*.pem"]
/// dlopen = "recommended"               # "required" | "recommended" | "suggested" | "none"
/// strip = true
/// strip-modules = "none"               # "none" | "debug"
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Policy {
    /// Globs over absolute store paths; every match is a root of the selection. A match
    /// that is a file is kept even if a prune class covers it; a match that is a directory
    /// is kept with its whole subtree, minus pruned files.
    pub keep: Vec<String>,
    /// Prune classes turned off (their files are kept when something needs them).
    pub keep_classes: Vec<PruneClass>,
    /// Prune classes turned back on (only meaningful when merging onto a parent).
    pub prune_classes: Vec<PruneClass>,
    /// Locales kept by the `locales` class, besides `C.UTF-8` (`en_US.UTF-8`, `de`, …).
    pub keep_locales: Vec<String>,
    /// gconv modules kept by the `gconv` class (`UTF-16` keeps `lib/gconv/UTF-16.so`).
    pub keep_gconv: Vec<String>,
    /// terminfo entries kept by the `terminfo` class, besides `linux`, `vt100`, `xterm`.
    pub keep_terminfo: Vec<String>,
    /// Extra globs of files to prune.
    pub prune_globs: Vec<String>,
    /// Store paths dropped entirely (absolute globs or name globs like `*-linux-*`).
    pub drop: Vec<DropRule>,
    /// Library names (globs) that may stay unresolved: DT_NEEDED, dlopen sonames, and
    /// interpreter paths.
    pub allow_missing: Vec<String>,
    /// Globs naming a referring file or the path it refers to: such a reference may point
    /// at a pruned file, a missing symlink target, or a store path not in the image.
    pub allow_dangling: Vec<String>,
    /// Image paths (globs) that may carry setuid/setgid bits.
    pub allow_setuid: Vec<String>,
    /// Image paths (globs) that may be world-writable.
    pub allow_world_writable: Vec<String>,
    /// Image paths (globs) that may hold a private key (test fixtures; real keys belong in
    /// `[[secrets]]` or are made at first boot).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_private_keys: Vec<String>,
    /// Globs on store path names (`systemd`, `openssl*`) the image must not contain: a kept
    /// file from or referring to a match fails the build (checked by the caller, which knows
    /// the closure).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forbid: Vec<String>,
    /// Lowest `.note.dlopen` priority that is followed (default `recommended`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlopen: Option<DlopenThreshold>,
    /// Whether ELF files are stripped at all (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip: Option<bool>,
    /// What stripping does to relocatable objects such as kernel modules (default `none`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip_modules: Option<StripModules>,
}

/// Locales kept whatever the policy says.
pub const DEFAULT_KEEP_LOCALES: &[&str] = &["C.UTF-8"];
/// terminfo entries kept whatever the policy says.
pub const DEFAULT_KEEP_TERMINFO: &[&str] = &["linux", "vt100", "xterm"];

impl Policy {
    /// `child` layered on `parent`: lists appended (duplicates dropped, first one wins),
    /// scalars from the child when it sets them, and the class toggles as described on
    /// [`Policy`].
    pub fn merge(parent: &Policy, child: &Policy) -> Policy {
        let keep_classes = append(
            &without(&parent.keep_classes, &child.prune_classes),
            &child.keep_classes,
        );
        let prune_classes = append(
            &without(&parent.prune_classes, &child.keep_classes),
            &child.prune_classes,
        );
        Policy {
            keep: append(&parent.keep, &child.keep),
            keep_classes,
            prune_classes,
            keep_locales: append(&parent.keep_locales, &child.keep_locales),
            keep_gconv: append(&parent.keep_gconv, &child.keep_gconv),
            keep_terminfo: append(&parent.keep_terminfo, &child.keep_terminfo),
            prune_globs: append(&parent.prune_globs, &child.prune_globs),
            drop: append(&parent.drop, &child.drop),
            allow_missing: append(&parent.allow_missing, &child.allow_missing),
            allow_dangling: append(&parent.allow_dangling, &child.allow_dangling),
            allow_setuid: append(&parent.allow_setuid, &child.allow_setuid),
            allow_world_writable: append(&parent.allow_world_writable, &child.allow_world_writable),
            allow_private_keys: append(&parent.allow_private_keys, &child.allow_private_keys),
            forbid: append(&parent.forbid, &child.forbid),
            dlopen: child.dlopen.or(parent.dlopen),
            strip: child.strip.or(parent.strip),
            strip_modules: child.strip_modules.or(parent.strip_modules),
        }
    }

    /// Checks every glob and the class toggles; errors name the key (`keep[1]`).
    pub fn validate(&self) -> Result<()> {
        let absolute = |key: &str, list: &[String]| -> Result<()> {
            for (i, g) in list.iter().enumerate() {
                let glob = Glob::new(g).map_err(|reason| invalid(key, i, reason))?;
                if !glob.is_absolute() || !g.starts_with("/nix/store/") {
                    return Err(invalid(
                        key,
                        i,
                        format!("{g:?} must start with /nix/store/"),
                    ));
                }
            }
            Ok(())
        };
        let any = |key: &str, list: &[String]| -> Result<()> {
            for (i, g) in list.iter().enumerate() {
                Glob::new(g).map_err(|reason| invalid(key, i, reason))?;
            }
            Ok(())
        };
        absolute("keep", &self.keep)?;
        any("prune-globs", &self.prune_globs)?;
        any("allow-missing", &self.allow_missing)?;
        any("allow-dangling", &self.allow_dangling)?;
        any("allow-setuid", &self.allow_setuid)?;
        any("allow-world-writable", &self.allow_world_writable)?;
        any("allow-private-keys", &self.allow_private_keys)?;
        for (i, g) in self.forbid.iter().enumerate() {
            let glob = Glob::new(g).map_err(|reason| invalid("forbid", i, reason))?;
            if glob.is_absolute() {
                return Err(invalid(
                    "forbid",
                    i,
                    format!("{g:?} is a path; give a store path name glob like \"systemd\" or \"openssl*\""),
                ));
            }
        }
        for (i, rule) in self.drop.iter().enumerate() {
            let glob = Glob::new(&rule.path).map_err(|reason| invalid("drop", i, reason))?;
            if glob.is_absolute() {
                let parts: Vec<&str> = rule.path.split('/').collect();
                if parts.len() != 4 || parts[1] != "nix" || parts[2] != "store" {
                    return Err(invalid(
                        "drop",
                        i,
                        format!(
                            "{:?} must name a store path (/nix/store/NAME) or be a name glob",
                            rule.path
                        ),
                    ));
                }
            }
        }
        for (key, list) in [
            ("keep-locales", &self.keep_locales),
            ("keep-gconv", &self.keep_gconv),
            ("keep-terminfo", &self.keep_terminfo),
        ] {
            for (i, name) in list.iter().enumerate() {
                if name.is_empty() || name.contains('/') {
                    return Err(invalid(key, i, format!("{name:?} is not a plain name")));
                }
            }
        }
        if let Some(class) = self
            .keep_classes
            .iter()
            .find(|c| self.prune_classes.contains(c))
        {
            return Err(Error::InvalidPolicy {
                key: "keep-classes".into(),
                reason: format!("class {class} is also in prune-classes"),
            });
        }
        Ok(())
    }

    /// The prune classes in force.
    pub fn pruned_classes(&self) -> BTreeSet<PruneClass> {
        PruneClass::ALL
            .iter()
            .copied()
            .filter(|c| !self.keep_classes.contains(c))
            .collect()
    }

    /// The dlopen threshold in force.
    pub fn dlopen_threshold(&self) -> DlopenThreshold {
        self.dlopen.unwrap_or(DlopenThreshold::Recommended)
    }

    /// Whether ELF files are stripped.
    pub fn strip_enabled(&self) -> bool {
        self.strip.unwrap_or(true)
    }

    /// What stripping does to relocatable objects.
    pub fn strip_modules(&self) -> StripModules {
        self.strip_modules.unwrap_or(StripModules::None)
    }

    /// Locales kept by the `locales` class, defaults included.
    pub fn kept_locales(&self) -> Vec<String> {
        with_defaults(DEFAULT_KEEP_LOCALES, &self.keep_locales)
    }

    /// terminfo entries kept by the `terminfo` class, defaults included.
    pub fn kept_terminfo(&self) -> Vec<String> {
        with_defaults(DEFAULT_KEEP_TERMINFO, &self.keep_terminfo)
    }
}

fn invalid(key: &str, index: usize, reason: String) -> Error {
    Error::InvalidPolicy {
        key: format!("{key}[{index}]"),
        reason,
    }
}

fn with_defaults(defaults: &[&str], list: &[String]) -> Vec<String> {
    let base: Vec<String> = defaults.iter().map(|s| s.to_string()).collect();
    append(&base, list)
}

fn append<T: Clone + PartialEq>(a: &[T], b: &[T]) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(a.len() + b.len());
    for item in a.iter().chain(b) {
        if !out.contains(item) {
            out.push(item.clone());
        }
    }
    out
}

fn without<T: Clone + PartialEq>(a: &[T], remove: &[T]) -> Vec<T> {
    a.iter().filter(|x| !remove.contains(x)).cloned().collect()
}

/// A named class of files that boards rarely need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneClass {
    /// `share/doc`, `share/doc-base`, `share/gtk-doc`, and README*, NEWS*, changelogs under `share`.
    Docs,
    /// `share/man`.
    Man,
    /// `share/info`.
    Info,
    /// `include`.
    Headers,
    /// `*.a` and `*.la` under `lib`.
    StaticLibs,
    /// `lib/pkgconfig`, `share/pkgconfig`.
    PkgConfig,
    /// `lib/cmake`, `share/cmake`.
    Cmake,
    /// `share/locale/*` and `lib/locale/*` except the kept locales.
    Locales,
    /// `lib/gconv/*` except the kept modules; its `gconv-modules*` configuration stays only
    /// while some module of that directory is kept.
    Gconv,
    /// `share/terminfo`, `lib/terminfo` except the kept entries.
    Terminfo,
    /// `share/bash-completion`, `share/zsh`, `share/fish`, `etc/bash_completion.d`.
    Completions,
    /// `share/lintian`.
    Lintian,
}

impl PruneClass {
    /// Every class, in declaration order.
    pub const ALL: &'static [PruneClass] = &[
        PruneClass::Docs,
        PruneClass::Man,
        PruneClass::Info,
        PruneClass::Headers,
        PruneClass::StaticLibs,
        PruneClass::PkgConfig,
        PruneClass::Cmake,
        PruneClass::Locales,
        PruneClass::Gconv,
        PruneClass::Terminfo,
        PruneClass::Completions,
        PruneClass::Lintian,
    ];

    /// The name used in TOML and reports.
    pub fn name(self) -> &'static str {
        match self {
            PruneClass::Docs => "docs",
            PruneClass::Man => "man",
            PruneClass::Info => "info",
            PruneClass::Headers => "headers",
            PruneClass::StaticLibs => "static-libs",
            PruneClass::PkgConfig => "pkg-config",
            PruneClass::Cmake => "cmake",
            PruneClass::Locales => "locales",
            PruneClass::Gconv => "gconv",
            PruneClass::Terminfo => "terminfo",
            PruneClass::Completions => "completions",
            PruneClass::Lintian => "lintian",
        }
    }
}

impl fmt::Display for PruneClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Priority of a `.note.dlopen` entry, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DlopenPriority {
    Suggested,
    Recommended,
    Required,
}

impl fmt::Display for DlopenPriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DlopenPriority::Suggested => "suggested",
            DlopenPriority::Recommended => "recommended",
            DlopenPriority::Required => "required",
        })
    }
}

/// The `dlopen` key: which `.note.dlopen` entries are followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DlopenThreshold {
    /// Not even required ones.
    None,
    Required,
    Recommended,
    Suggested,
}

impl DlopenThreshold {
    /// True if entries of `priority` are followed.
    pub fn admits(self, priority: DlopenPriority) -> bool {
        match self {
            DlopenThreshold::None => false,
            DlopenThreshold::Required => priority >= DlopenPriority::Required,
            DlopenThreshold::Recommended => priority >= DlopenPriority::Recommended,
            DlopenThreshold::Suggested => true,
        }
    }
}

/// The `strip-modules` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StripModules {
    /// Relocatable objects (kernel modules) are left byte-identical.
    #[default]
    None,
    /// Their debug sections are removed; symbols stay.
    Debug,
}

/// One `drop` entry: a store path glob, and whether references to it are rewritten.
///
/// In TOML either a string (`"*-linux-*"`) or a table (`{ path = "…", rewrite = true }`).
/// With `rewrite`, every kept file that refers to a dropped store path has the path's hash
/// replaced by `eeee…` (same length, as nixpkgs' `remove-references-to` does); without it,
/// such a reference is an error naming the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropRule {
    pub path: String,
    pub rewrite: bool,
}

impl Serialize for DropRule {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.rewrite {
            #[derive(Serialize)]
            struct Table<'a> {
                path: &'a str,
                rewrite: bool,
            }
            Table {
                path: &self.path,
                rewrite: true,
            }
            .serialize(s)
        } else {
            s.serialize_str(&self.path)
        }
    }
}

impl<'de> Deserialize<'de> for DropRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DropRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a store path glob or a table { path = \"…\", rewrite = true }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<DropRule, E> {
                Ok(DropRule {
                    path: v.to_owned(),
                    rewrite: false,
                })
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<DropRule, A::Error> {
                let mut path = None;
                let mut rewrite = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "path" if path.is_none() => path = Some(map.next_value::<String>()?),
                        "rewrite" if rewrite.is_none() => rewrite = Some(map.next_value::<bool>()?),
                        "path" | "rewrite" => return Err(de::Error::duplicate_field("path")),
                        other => return Err(de::Error::unknown_field(other, &["path", "rewrite"])),
                    }
                }
                Ok(DropRule {
                    path: path.ok_or_else(|| de::Error::missing_field("path"))?,
                    rewrite: rewrite.unwrap_or(false),
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A compiled glob (see the module docs for the syntax).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    text: String,
    absolute: bool,
    comps: Vec<Comp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Comp {
    /// `**`: any number of components.
    AnyDepth,
    Pattern(Vec<Tok>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Char(char),
    /// `?`
    One,
    /// `*`
    Any,
}

impl Glob {
    /// Compiles `pattern`; the error says what is wrong with it.
    pub fn new(pattern: &str) -> std::result::Result<Glob, String> {
        if pattern.is_empty() {
            return Err("empty glob".into());
        }
        let absolute = pattern.starts_with('/');
        let body = if absolute { &pattern[1..] } else { pattern };
        if !absolute && body.contains('/') {
            return Err(format!(
                "glob {pattern:?} must be absolute (start with /) or a plain name without /"
            ));
        }
        let mut comps = Vec::new();
        for part in body.split('/') {
            match part {
                "" => return Err(format!("glob {pattern:?} has an empty component")),
                "." | ".." => return Err(format!("glob {pattern:?} has a {part:?} component")),
                "**" => {
                    if comps.last() != Some(&Comp::AnyDepth) {
                        comps.push(Comp::AnyDepth)
                    }
                }
                _ => {
                    let mut toks = Vec::new();
                    for c in part.chars() {
                        match c {
                            '*' if toks.last() == Some(&Tok::Any) => {}
                            '*' => toks.push(Tok::Any),
                            '?' => toks.push(Tok::One),
                            c => toks.push(Tok::Char(c)),
                        }
                    }
                    comps.push(Comp::Pattern(toks));
                }
            }
        }
        Ok(Glob {
            text: pattern.to_owned(),
            absolute,
            comps,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for patterns that match whole absolute paths.
    pub fn is_absolute(&self) -> bool {
        self.absolute
    }

    /// True if `path` matches: the whole absolute path for absolute patterns, the last
    /// component otherwise.
    pub fn matches(&self, path: &str) -> bool {
        if self.absolute {
            match path.strip_prefix('/') {
                Some(rest) => match_comps(&self.comps, &split(rest), false),
                None => false,
            }
        } else {
            let name = path.rsplit('/').next().unwrap_or(path);
            match &self.comps[..] {
                [Comp::Pattern(toks)] => wild(toks, &name.chars().collect::<Vec<_>>()),
                _ => true, // `**` alone
            }
        }
    }

    /// True if something inside directory `dir` (an absolute path) could match.
    pub fn may_match_below(&self, dir: &str) -> bool {
        if !self.absolute {
            return true;
        }
        match dir.strip_prefix('/') {
            Some(rest) => match_comps(&self.comps, &split(rest), true),
            None => false,
        }
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn split(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// With `prefix`, a path that ends while the pattern goes on counts as a match.
fn match_comps(pattern: &[Comp], path: &[&str], prefix: bool) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((Comp::AnyDepth, rest)) => {
            if prefix && !path.is_empty() {
                return true;
            }
            (0..=path.len()).any(|i| match_comps(rest, &path[i..], prefix))
        }
        Some((Comp::Pattern(toks), rest)) => match path.split_first() {
            None => prefix,
            Some((first, path_rest)) => {
                wild(toks, &first.chars().collect::<Vec<_>>())
                    && match_comps(rest, path_rest, prefix)
            }
        },
    }
}

/// Wildcard match of one component, iterative with single-star backtracking.
fn wild(toks: &[Tok], text: &[char]) -> bool {
    let (mut t, mut s) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while s < text.len() {
        match toks.get(t) {
            Some(Tok::Any) => {
                star = Some((t, s));
                t += 1;
            }
            Some(Tok::One) => {
                t += 1;
                s += 1;
            }
            Some(Tok::Char(c)) if *c == text[s] => {
                t += 1;
                s += 1;
            }
            _ => match star {
                Some((st, ss)) => {
                    t = st + 1;
                    s = ss + 1;
                    star = Some((st, ss + 1));
                }
                None => return false,
            },
        }
    }
    toks[t..].iter().all(|tok| *tok == Tok::Any)
}

/// A list of globs from one policy key.
#[derive(Clone, Debug, Default)]
pub(crate) struct GlobSet {
    globs: Vec<Glob>,
}

impl GlobSet {
    /// Compiles `patterns`; errors name `key[i]`.
    pub(crate) fn new(key: &str, patterns: &[String]) -> Result<GlobSet> {
        let globs = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| Glob::new(p).map_err(|reason| invalid(key, i, reason)))
            .collect::<Result<Vec<_>>>()?;
        Ok(GlobSet { globs })
    }

    /// The first glob matching `path`.
    pub(crate) fn find(&self, path: &str) -> Option<&Glob> {
        self.globs.iter().find(|g| g.matches(path))
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        self.find(path).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }

    #[test]
    fn glob_star_question_and_double_star() {
        let gl = g("/nix/store/*-glibc-*/lib/gconv/UTF-16.so");
        assert!(gl.matches("/nix/store/abc-glibc-2.36/lib/gconv/UTF-16.so"));
        assert!(!gl.matches("/nix/store/abc-glibc-2.36/lib/gconv/UTF-16.so.x"));
        assert!(!gl.matches("/nix/store/abc-musl/lib/gconv/UTF-16.so"));
        assert!(!gl.matches("nix/store/abc-glibc-2.36/lib/gconv/UTF-16.so"));
        let gl = g("/nix/store/*/share/**");
        assert!(gl.matches("/nix/store/x/share"));
        assert!(gl.matches("/nix/store/x/share/a/b/c"));
        assert!(!gl.matches("/nix/store/x/lib/a"));
        let gl = g("/nix/store/**/*.so.?");
        assert!(gl.matches("/nix/store/x/lib/libc.so.6"));
        assert!(!gl.matches("/nix/store/x/lib/libc.so.66"));
        let gl = g("*-linux-*");
        assert!(gl.matches("/nix/store/abc-linux-6.1"));
        assert!(gl.matches("abc-linux-6.1"));
        assert!(!gl.matches("/nix/store/abc-linux/x"));
        assert!(g("a*b*c").matches("/x/aXbYbZc"));
        assert!(!g("a*b*c").matches("aXbYbZ"));
        assert!(g("*").matches(""));
    }

    #[test]
    fn glob_prefix_matching_prunes_walks() {
        let gl = g("/nix/store/*-glibc-*/lib/gconv/*.so");
        assert!(gl.may_match_below("/nix/store/abc-glibc-2"));
        assert!(gl.may_match_below("/nix/store/abc-glibc-2/lib"));
        assert!(!gl.may_match_below("/nix/store/abc-glibc-2/share"));
        assert!(!gl.may_match_below("/nix/store/abc-busybox"));
        assert!(g("/nix/store/*/lib/**").may_match_below("/nix/store/a/lib/x/y"));
    }

    #[test]
    fn bad_globs_are_rejected() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("lib/*.so")
            .unwrap_err()
            .contains("must be absolute"));
        assert!(Glob::new("/nix//store").is_err());
        assert!(Glob::new("/nix/../store").is_err());
    }

    #[test]
    fn merge_appends_forbid() {
        let parent = Policy {
            forbid: vec!["systemd".into()],
            ..Policy::default()
        };
        let child = Policy {
            forbid: vec!["openssl*".into(), "systemd".into()],
            ..Policy::default()
        };
        assert_eq!(
            Policy::merge(&parent, &child).forbid,
            ["systemd", "openssl*"]
        );
    }

    #[test]
    fn merge_appends_lists_overrides_scalars_and_toggles_classes() {
        let parent = Policy {
            keep: vec!["/nix/store/*-a/x".into()],
            keep_classes: vec![PruneClass::Locales, PruneClass::Man],
            keep_locales: vec!["de".into()],
            dlopen: Some(DlopenThreshold::Required),
            strip: Some(false),
            ..Policy::default()
        };
        let child = Policy {
            keep: vec!["/nix/store/*-b/y".into(), "/nix/store/*-a/x".into()],
            prune_classes: vec![PruneClass::Locales],
            keep_locales: vec!["fr".into()],
            strip: Some(true),
            ..Policy::default()
        };
        let merged = Policy::merge(&parent, &child);
        assert_eq!(merged.keep, ["/nix/store/*-a/x", "/nix/store/*-b/y"]);
        assert_eq!(merged.keep_classes, [PruneClass::Man]);
        assert!(merged.pruned_classes().contains(&PruneClass::Locales));
        assert!(!merged.pruned_classes().contains(&PruneClass::Man));
        assert_eq!(merged.kept_locales(), ["C.UTF-8", "de", "fr"]);
        assert_eq!(merged.dlopen_threshold(), DlopenThreshold::Required);
        assert!(merged.strip_enabled());
        merged.validate().unwrap();
    }

    #[test]
    fn validate_names_the_key() {
        let p = Policy {
            keep: vec!["/nix/store/*-a/x".into(), "share/doc".into()],
            ..Policy::default()
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(err.starts_with("image policy key keep[1]: "), "{err}");
        let p = Policy {
            drop: vec![DropRule {
                path: "/nix/store/a/lib".into(),
                rewrite: false,
            }],
            ..Policy::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("drop[0]"));
        let p = Policy {
            forbid: vec!["systemd".into(), "/nix/store/*-openssl-*".into()],
            ..Policy::default()
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("image policy key forbid[1]: ") && err.contains("store path name glob"),
            "{err}"
        );
        let p = Policy {
            keep_classes: vec![PruneClass::Docs],
            prune_classes: vec![PruneClass::Docs],
            ..Policy::default()
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn dlopen_threshold_order() {
        use DlopenPriority::*;
        assert!(DlopenThreshold::Recommended.admits(Required));
        assert!(DlopenThreshold::Recommended.admits(Recommended));
        assert!(!DlopenThreshold::Recommended.admits(Suggested));
        assert!(!DlopenThreshold::None.admits(Required));
        assert!(DlopenThreshold::Suggested.admits(Suggested));
    }
}
