//! bonsai's cache folder on the host: the offline set's Debian packages, the pack cache, the
//! SSH key.

use std::path::PathBuf;

/// `$BONSAI_CACHE`, else `$XDG_CACHE_HOME/bonsai`, else `~/.cache/bonsai`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BONSAI_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("bonsai");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/bonsai")
}
