//! Host prerequisites: find the programs bonsai drives (Nix, QEMU, the kernel toolchain) and,
//! as root on Debian/Ubuntu, install what is missing with apt-get; otherwise stop with the
//! exact command to run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const NIX: Tool = Tool {
    program: "nix-build",
    package: "nix-bin",
};
pub const CPIO: Tool = Tool {
    program: "cpio",
    package: "cpio",
};
pub const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
};
pub const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
};

/// What building a kernel from source needs on the host.
pub const KERNEL_TOOLS: &[Tool] = &[
    Tool {
        program: "gcc",
        package: "gcc",
    },
    Tool {
        program: "make",
        package: "make",
    },
    Tool {
        program: "flex",
        package: "flex",
    },
    Tool {
        program: "bison",
        package: "bison",
    },
    Tool {
        program: "bc",
        package: "bc",
    },
    Tool {
        program: "perl",
        package: "perl",
    },
    Tool {
        program: "xz",
        package: "xz-utils",
    },
];
/// libelf headers for objtool, found by file rather than by program.
pub const LIBELF_HEADER: (&str, &str) = ("/usr/include/libelf.h", "libelf-dev");

/// The host's architecture (builders run there).
pub fn host_arch() -> Result<crate::config::Arch> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(crate::config::Arch::X86_64),
        "aarch64" => Ok(crate::config::Arch::Aarch64),
        other => bail!("unsupported host architecture {other} (bonsai's offline set supports x86_64 and aarch64 hosts)"),
    }
}

/// What building for a board of another architecture than the host's needs (kernel and C
/// programs): Debian's cross compiler, and the target's C library headers found by file.
/// `None` for a native build.
pub fn cross_tools(
    target: crate::config::Arch,
    host: crate::config::Arch,
) -> Option<(Tool, (&'static str, &'static str))> {
    use crate::config::Arch;
    if target == host {
        return None;
    }
    Some(match target {
        Arch::Aarch64 => (
            Tool {
                program: "aarch64-linux-gnu-gcc",
                package: "gcc-aarch64-linux-gnu",
            },
            (
                "/usr/aarch64-linux-gnu/include/stdio.h",
                "libc6-dev-arm64-cross",
            ),
        ),
        Arch::X86_64 => (
            Tool {
                program: "x86_64-linux-gnu-gcc",
                package: "gcc-x86-64-linux-gnu",
            },
            (
                "/usr/x86_64-linux-gnu/include/stdio.h",
                "libc6-dev-amd64-cross",
            ),
        ),
    })
}

pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY-free: read our effective uid from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Makes sure every tool (and extra package, for files such as headers) is there. Missing ones
/// are installed with apt-get when we are root on a Debian-like system, else this fails with
/// the command to run.
pub fn ensure(tools: &[Tool], extra_packages: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|t| find_program(t.program).is_none())
        .map(|t| t.package)
        .collect();
    for (file, package) in extra_packages {
        if !Path::new(file).exists() {
            missing.push(package);
        }
    }
    install_or_explain(&missing)
}

/// `BONSAI_NO_INSTALL=1`: never install host packages, only say what to install (as when not
/// root). For machines whose packages are managed elsewhere, and for testing that message.
fn no_install() -> bool {
    std::env::var_os("BONSAI_NO_INSTALL").is_some_and(|v| !v.is_empty() && v != "0")
}

fn install_or_explain(packages: &[&str]) -> Result<()> {
    let mut missing = packages.to_vec();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let apt = find_program("apt-get");
    if !is_root() || apt.is_none() || no_install() {
        bail!("missing host packages: {list}; install them with: sudo apt-get install -y {list}");
    }
    crate::ui::step(format!("installing host packages: {list}"));
    apt_install(&missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let install = |quiet_fail: bool| -> Result<bool> {
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .context("running apt-get install")?;
        if !out.status.success() && !quiet_fail {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!("apt-get install {} failed: {last}", packages.join(" "));
        }
        Ok(out.status.success())
    };
    if install(true)? {
        return Ok(());
    }
    // A fresh machine may have no package lists yet.
    crate::ui::detail("apt-get update");
    let status = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        crate::ui::warn("apt-get update reported errors; trying the install anyway");
    }
    install(false).map(|_| ())
}

/// Environment for Nix commands. Debian's nix-bin runs single-user as root when no daemon is
/// there: no build users, no sandbox (it needs user namespaces bonsai cannot count on).
pub fn nix_env() -> Vec<(String, String)> {
    let mut conf = std::env::var("NIX_CONFIG").unwrap_or_default();
    let daemon = Path::new("/nix/var/nix/daemon-socket/socket").exists();
    if !daemon && is_root() {
        if !conf.contains("build-users-group") {
            conf.push_str("\nbuild-users-group =");
        }
        if !conf.contains("sandbox") {
            conf.push_str("\nsandbox = false");
        }
    }
    if !conf.contains("experimental-features") {
        conf.push_str("\nexperimental-features = nix-command flakes");
    }
    // The team's caches and builders (bonsai.toml).
    conf.push_str(&crate::settings::current().nix_config());
    vec![("NIX_CONFIG".into(), conf.trim().to_string())]
}

/// First line of `<program> --version`, to key caches and derivations on a toolchain.
pub fn version_line(program: &str) -> Result<String> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .with_context(|| format!("running {program} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// Like [`ensure`] for a program named in a board file.
pub fn ensure_program(program: &str, package: &str) -> Result<()> {
    if find_program(program).is_some() {
        return Ok(());
    }
    install_or_explain(&[package])
}
