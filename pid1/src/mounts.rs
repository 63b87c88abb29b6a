//! Mounting the configured filesystems.

use std::fs::{DirBuilder, Permissions};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use nix::mount::MsFlags;

use crate::config::Mount;
use crate::console::log;

/// Splits an options string into mount flags and the data string passed to the filesystem.
pub fn parse_options(options: &str) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        match opt {
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "ro" => flags |= MsFlags::MS_RDONLY,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "rw" | "defaults" => {}
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

/// What gets mounted when the config cannot be read, so an emergency shell is usable.
pub fn emergency_mounts() -> Vec<Mount> {
    let m = |source: &str, target: &str, fstype: &str, options: &str| Mount {
        source: source.into(),
        target: target.into(),
        fstype: fstype.into(),
        options: options.into(),
        mode: None,
    };
    vec![
        m("proc", "/proc", "proc", "nosuid,nodev,noexec"),
        m("sysfs", "/sys", "sysfs", "nosuid,nodev,noexec"),
        m("devtmpfs", "/dev", "devtmpfs", "nosuid,mode=0755"),
        m("tmpfs", "/run", "tmpfs", "nosuid,nodev,mode=0755"),
        m("tmpfs", "/tmp", "tmpfs", "nosuid,nodev,mode=1777"),
    ]
}

/// Mounts each entry in order; a failure is logged and the next one is tried.
pub fn mount_all(mounts: &[Mount]) {
    for m in mounts {
        if let Err(e) = mount_one(m) {
            log!("mount {} ({}) failed: {e}", m.target, m.fstype);
        }
    }
}

fn mount_one(m: &Mount) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&m.target)
        .map_err(|e| format!("cannot create the mount point: {e}"))?;
    let (flags, data) = parse_options(&m.options);
    let data = (!data.is_empty()).then_some(data.as_str());
    nix::mount::mount(
        Some(m.source.as_str()),
        m.target.as_str(),
        Some(m.fstype.as_str()),
        flags,
        data,
    )
    .map_err(|e| e.to_string())?;
    if let Some(mode) = m.mode {
        std::fs::set_permissions(&m.target, Permissions::from_mode(mode))
            .map_err(|e| format!("mounted, but chmod {mode:o} failed: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_data_are_separated() {
        let (f, d) = parse_options("nosuid,nodev,noexec");
        assert_eq!(
            f,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
        );
        assert_eq!(d, "");
        let (f, d) = parse_options("nosuid,mode=0755,gid=5,noatime");
        assert_eq!(f, MsFlags::MS_NOSUID | MsFlags::MS_NOATIME);
        assert_eq!(d, "mode=0755,gid=5");
        let (f, d) = parse_options("ro,relatime,size=10m");
        assert_eq!(f, MsFlags::MS_RDONLY | MsFlags::MS_RELATIME);
        assert_eq!(d, "size=10m");
    }

    #[test]
    fn empty_and_neutral_options() {
        assert_eq!(parse_options(""), (MsFlags::empty(), String::new()));
        assert_eq!(
            parse_options("rw,defaults,"),
            (MsFlags::empty(), String::new())
        );
        assert_eq!(
            parse_options(" nodev , mode=1777 "),
            (MsFlags::MS_NODEV, "mode=1777".into())
        );
    }

    #[test]
    fn emergency_set_covers_the_basics() {
        let targets: Vec<String> = emergency_mounts().into_iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/run", "/tmp"]);
    }
}
