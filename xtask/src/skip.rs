//! Skip or fail: the one rule for a test, check or command part that cannot run on this host.
//! Outside CI a skip is said plainly and the rest goes on. In CI (`CI=true`, set by CI) a skip
//! is a failure, unless [`CI_ALLOWED`] names it with the reason it cannot apply there, and the
//! README's "Skips" paragraph allows it (a test keeps the two in step).
//!
//! Std only: `pid1/tests` include this file with `#[path]`, so the rule lives in one place.

/// Skips allowed in CI: (what, why it cannot apply on a CI host). None today.
pub const CI_ALLOWED: &[(&str, &str)] = &[];

/// Whether this runs in CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Decides a skip of `what` because of `why`: `Ok(line to print)` when it may be skipped,
/// `Err(line)` when the skip must fail.
pub fn skip(what: &str, why: &str) -> Result<String, String> {
    decide(what, why, in_ci())
}

/// [`skip`] with the CI flag given (for tests).
pub fn decide(what: &str, why: &str, ci: bool) -> Result<String, String> {
    let line = format!("skipped: {what}: {why}");
    if ci && !CI_ALLOWED.iter().any(|(w, _)| *w == what) {
        return Err(format!("{line} (CI=true: a skip fails in CI)"));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_passes_outside_ci_and_fails_in_ci() {
        assert_eq!(
            decide("the namespace test", "not root", false),
            Ok("skipped: the namespace test: not root".into())
        );
        let e = decide("the namespace test", "not root", true).unwrap_err();
        assert!(e.contains("a skip fails in CI"), "{e}");
    }

    /// Every skip allowed in CI is named in the README, with its reason.
    #[test]
    fn ci_allowed_skips_are_in_the_readme() {
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains("a skip fails"),
            "the README says nothing about skips in CI"
        );
        for (what, why) in CI_ALLOWED {
            assert!(
                readme.contains(what) && readme.contains(why),
                "README does not allow skipping {what} ({why}) in CI"
            );
        }
    }
}
