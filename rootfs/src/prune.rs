//! Prune rules: which files of a store path a board never needs (documentation, headers,
//! unused locales, …), by class ([`PruneClass`]) and by the policy's `prune-globs`.
//!
//! Rules look at the path inside its store path (`share/doc/libc6/copyright` of
//! `/nix/store/…-glibc`), so they apply to every package laid out like a Nixpkgs output.

use std::collections::BTreeSet;
use std::fmt;

use crate::error::Result;
use crate::policy::{GlobSet, Policy, PruneClass};
use crate::refs;

/// Why a path is pruned.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PruneRule {
    Class(PruneClass),
    /// A `prune-globs` entry.
    Glob(String),
}

impl fmt::Display for PruneRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PruneRule::Class(c) => write!(f, "class {c}"),
            PruneRule::Glob(g) => write!(f, "glob {g}"),
        }
    }
}

impl PruneRule {
    /// The key used in per-rule statistics: `docs`, `glob /nix/store/*/x/**`.
    pub fn key(&self) -> String {
        match self {
            PruneRule::Class(c) => c.name().to_owned(),
            PruneRule::Glob(g) => format!("glob {g}"),
        }
    }
}

/// The compiled prune rules of a policy.
#[derive(Clone, Debug)]
pub(crate) struct Pruner {
    classes: BTreeSet<PruneClass>,
    /// Normalised names of kept locales with their fallbacks (`en_us.utf8`, `en_us`, `en`).
    locales: BTreeSet<String>,
    gconv: BTreeSet<String>,
    terminfo: BTreeSet<String>,
    globs: GlobSet,
}

impl Pruner {
    pub(crate) fn new(policy: &Policy) -> Result<Pruner> {
        let mut locales = BTreeSet::new();
        for name in policy.kept_locales() {
            locales.extend(locale_fallbacks(&name));
        }
        Ok(Pruner {
            classes: policy.pruned_classes(),
            locales,
            gconv: policy.keep_gconv.iter().cloned().collect(),
            terminfo: policy.kept_terminfo().into_iter().collect(),
            globs: GlobSet::new("prune-globs", &policy.prune_globs)?,
        })
    }

    /// The rule pruning `path` (absolute, inside a store path), if any. Directories are
    /// checked too, so a walk need not descend into `share/doc`.
    pub(crate) fn check(&self, path: &str, is_dir: bool) -> Option<PruneRule> {
        if let Some(g) = self.globs.find(path) {
            return Some(PruneRule::Glob(g.as_str().to_owned()));
        }
        let (_, rest) = refs::split_store_path(path)?;
        let rel = rest.strip_prefix('/')?;
        let class = classify(rel, is_dir, self)?;
        self.classes
            .contains(&class)
            .then_some(PruneRule::Class(class))
    }

    /// True if `path` is gconv configuration (`lib/gconv/gconv-modules*`), which the
    /// `gconv` class keeps only while a module of the same directory is kept.
    pub(crate) fn is_gconv_config(path: &str) -> bool {
        gconv_dir_entry(path).is_some_and(|name| name.starts_with("gconv-modules"))
    }
}

/// For `/nix/store/x/lib/gconv/NAME[/...]`, `/nix/store/x/lib/gconv`.
pub(crate) fn gconv_dir(path: &str) -> Option<&str> {
    gconv_dir_entry(path)?;
    let (base, _) = refs::split_store_path(path)?;
    let end = refs::STORE_DIR.len() + 1 + base.len();
    let rest = &path[end..];
    let dir_len = if rest.starts_with("/lib/gconv/") {
        10
    } else {
        12
    };
    Some(&path[..end + dir_len])
}

/// For `/nix/store/x/lib/gconv/NAME[/...]`, NAME.
pub(crate) fn gconv_dir_entry(path: &str) -> Option<&str> {
    let (_, rest) = refs::split_store_path(path)?;
    let rest = rest
        .strip_prefix("/lib/gconv/")
        .or_else(|| rest.strip_prefix("/lib64/gconv/"))?;
    rest.split('/').next()
}

fn classify(rel: &str, is_dir: bool, p: &Pruner) -> Option<PruneClass> {
    let c: Vec<&str> = rel.split('/').collect();
    let under = |prefix: &[&str]| c.len() >= prefix.len() && c[..prefix.len()] == *prefix;
    let name = *c.last()?;
    let libdir = matches!(c[0], "lib" | "lib64");

    if under(&["share", "doc"]) || under(&["share", "doc-base"]) || under(&["share", "gtk-doc"]) {
        return Some(PruneClass::Docs);
    }
    if c[0] == "share" && !is_dir && is_doc_name(name) {
        return Some(PruneClass::Docs);
    }
    if under(&["share", "man"]) {
        return Some(PruneClass::Man);
    }
    if under(&["share", "info"]) {
        return Some(PruneClass::Info);
    }
    if c[0] == "include" {
        return Some(PruneClass::Headers);
    }
    if libdir && !is_dir && (name.ends_with(".a") || name.ends_with(".la")) {
        return Some(PruneClass::StaticLibs);
    }
    if (libdir || c[0] == "share") && c.get(1) == Some(&"pkgconfig") {
        return Some(PruneClass::PkgConfig);
    }
    if (libdir || c[0] == "share") && c.get(1) == Some(&"cmake") {
        return Some(PruneClass::Cmake);
    }
    if under(&["share", "bash-completion"])
        || under(&["share", "zsh"])
        || under(&["share", "fish"])
        || under(&["etc", "bash_completion.d"])
    {
        return Some(PruneClass::Completions);
    }
    if under(&["share", "lintian"]) {
        return Some(PruneClass::Lintian);
    }
    if (under(&["share", "locale"]) || (libdir && c.get(1) == Some(&"locale"))) && c.len() >= 3 {
        return (!p.locales.contains(&normalize_locale(c[2]))).then_some(PruneClass::Locales);
    }
    if libdir && c.get(1) == Some(&"gconv") && c.len() >= 3 {
        let entry = c[2];
        if entry.starts_with("gconv-modules") {
            return Some(PruneClass::Gconv);
        }
        let module = entry.strip_suffix(".so").unwrap_or(entry);
        return (!p.gconv.contains(module)).then_some(PruneClass::Gconv);
    }
    if (c[0] == "share" || libdir) && c.get(1) == Some(&"terminfo") && c.len() >= 4 {
        return (!p.terminfo.contains(c[3])).then_some(PruneClass::Terminfo);
    }
    None
}

fn is_doc_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["README", "CHANGELOG", "NEWS", "CHANGES"]
        .iter()
        .any(|p| upper.starts_with(p))
}

/// `C.UTF-8` → `c.utf8`: lowercase, and the codeset without `-`/`_`, as glibc normalises it.
fn normalize_locale(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    match lower.split_once('.') {
        Some((lang, codeset)) => {
            let (codeset, modifier) = match codeset.split_once('@') {
                Some((c, m)) => (c.to_owned(), format!("@{m}")),
                None => (codeset.to_owned(), String::new()),
            };
            let codeset: String = codeset
                .chars()
                .filter(|c| !matches!(c, '-' | '_'))
                .collect();
            format!("{lang}.{codeset}{modifier}")
        }
        None => lower,
    }
}

/// The names under which gettext and glibc look a locale up: `en_US.UTF-8@euro` also finds
/// `en_US.UTF-8`, `en_US`, `en`.
fn locale_fallbacks(name: &str) -> Vec<String> {
    let mut out = vec![normalize_locale(name)];
    let no_mod = name.split('@').next().unwrap_or(name);
    let lang_country = no_mod.split('.').next().unwrap_or(no_mod);
    let lang = lang_country.split('_').next().unwrap_or(lang_country);
    for n in [no_mod, lang_country, lang] {
        let n = normalize_locale(n);
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SP: &str = "/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-glibc-2.36";

    fn check(p: &Pruner, rel: &str) -> Option<String> {
        p.check(&format!("{SP}/{rel}"), false).map(|r| r.key())
    }

    #[test]
    fn classes_cover_the_usual_places() {
        let p = Pruner::new(&Policy::default()).unwrap();
        for (rel, class) in [
            ("share/doc/libc6/copyright", Some("docs")),
            ("share/doc-base/runit", Some("docs")),
            ("share/runit/README.md", Some("docs")),
            ("share/man/man8/runsv.8.gz", Some("man")),
            ("share/info/libc.info", Some("info")),
            ("include/stdio.h", Some("headers")),
            ("lib/libc.a", Some("static-libs")),
            ("lib/libfoo.la", Some("static-libs")),
            ("lib/pkgconfig/zlib.pc", Some("pkg-config")),
            ("lib/cmake/Foo/FooConfig.cmake", Some("cmake")),
            ("share/locale/de/LC_MESSAGES/x.mo", Some("locales")),
            ("share/locale/locale.alias", Some("locales")),
            ("lib/locale/C.utf8/LC_CTYPE", None),
            ("lib/locale/locale-archive", Some("locales")),
            ("lib/gconv/IBM880.so", Some("gconv")),
            ("lib/gconv/gconv-modules", Some("gconv")),
            ("share/terminfo/l/linux", None),
            ("share/terminfo/a/ansi", Some("terminfo")),
            ("share/bash-completion/completions/sv", Some("completions")),
            ("share/lintian/overrides/libc6", Some("lintian")),
            ("lib/libc.so.6", None),
            ("bin/README", None),
            ("etc/runit/README", None),
        ] {
            assert_eq!(check(&p, rel).as_deref(), class, "{rel}");
        }
        assert!(Pruner::is_gconv_config(&format!(
            "{SP}/lib/gconv/gconv-modules.d/x.conf"
        )));
        assert!(!Pruner::is_gconv_config(&format!(
            "{SP}/lib/gconv/UTF-16.so"
        )));
    }

    #[test]
    fn keep_lists_and_class_toggles() {
        let policy = Policy {
            keep_locales: vec!["de_DE.UTF-8@euro".into()],
            keep_gconv: vec!["UTF-16".into()],
            keep_classes: vec![PruneClass::Man],
            prune_globs: vec![
                "/nix/store/*-glibc-*/lib/libBrokenLocale.so.1".into(),
                "*.pyc".into(),
            ],
            ..Policy::default()
        };
        let p = Pruner::new(&policy).unwrap();
        assert_eq!(check(&p, "share/locale/de/LC_MESSAGES/x.mo"), None);
        assert_eq!(check(&p, "share/locale/de_DE/LC_MESSAGES/x.mo"), None);
        assert_eq!(check(&p, "lib/locale/de_DE.utf8@euro/LC_CTYPE"), None);
        assert_eq!(
            check(&p, "share/locale/fr/LC_MESSAGES/x.mo").as_deref(),
            Some("locales")
        );
        assert_eq!(check(&p, "lib/gconv/UTF-16.so"), None);
        assert_eq!(check(&p, "share/man/man1/ls.1"), None);
        assert_eq!(
            check(&p, "lib/libBrokenLocale.so.1").as_deref(),
            Some("glob /nix/store/*-glibc-*/lib/libBrokenLocale.so.1")
        );
        assert_eq!(check(&p, "lib/python/x.pyc").as_deref(), Some("glob *.pyc"));
    }

    #[test]
    fn locale_normalisation() {
        assert_eq!(normalize_locale("C.UTF-8"), "c.utf8");
        assert_eq!(normalize_locale("en_US.ISO-8859-1"), "en_us.iso88591");
        assert_eq!(
            locale_fallbacks("en_US.UTF-8"),
            ["en_us.utf8", "en_us", "en"]
        );
    }
}
