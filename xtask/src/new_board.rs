//! `cargo xtask new-board <name> --from <board>`: a new board file (every key explained in a
//! comment), its own kernel fragment and a README, validated, never overwriting anything.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::config::{valid_name, Config, KernelSource};
use crate::{project_root, ui};

#[derive(Args, Debug)]
pub struct NewBoard {
    /// Name of the new board (letters, digits, - and _)
    pub name: String,
    /// Board to start from
    #[arg(long, default_value = "qemu-x86_64")]
    pub from: String,
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

impl NewBoard {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let cfg = Config::new(&root);
        if !valid_name(&self.name) {
            bail!("board name '{}' must be letters, digits, - and _ (at most 64, not starting with -)", self.name);
        }
        let from = cfg.load_board(&self.from)?;
        let board_file = root.join("boards").join(format!("{}.toml", self.name));
        let readme = root.join("boards").join(format!("{}.md", self.name));
        let fragment_name = format!("{}.config", self.name);
        let fragment = root.join("kernel-configs").join(&fragment_name);
        for f in [&board_file, &readme, &fragment] {
            if f.exists() {
                bail!("{} already exists; new-board never overwrites (pick another name or remove it)", f.strip_prefix(&root).unwrap_or(f).display());
            }
        }
        let mut kernel = String::new();
        match &from.kernel.source {
            KernelSource::Build { base, fragments } => {
                // The new board's fragment starts as the merge of the source board's fragments.
                // One fragment is copied byte for byte: a fragment enters the Nix store by its
                // bytes (comments included), so the copy reuses the source board's cached
                // kernel until someone edits it.
                let read = |f: &String| {
                    std::fs::read_to_string(root.join("kernel-configs").join(f))
                        .with_context(|| format!("reading kernel-configs/{f}"))
                };
                let text = match fragments.as_slice() {
                    [one] => read(one)?,
                    _ => {
                        let mut text = format!("# {}: kernel options merged onto {base}; every option set here is asserted after olddefconfig\n# (started from {} by cargo xtask new-board)\n", self.name, self.from);
                        for f in fragments {
                            let _ = write!(text, "\n# --- from {f}\n{}", read(f)?);
                        }
                        text
                    }
                };
                write_new(&fragment, &text)?;
                let _ = write!(
                    kernel,
                    "# base config the fragments are merged onto: tinyconfig, defconfig or allnoconfig\nbase = {}\n# fragments under kernel-configs/, merged in order\nfragments = {}\n",
                    q(base),
                    list(std::slice::from_ref(&fragment_name))
                );
            }
            KernelSource::Package(p) => {
                let _ = write!(kernel, "# a prebuilt kernel package (Nix attribute) instead of base + fragments\npackage = {}\n", q(p));
            }
        }
        let _ = write!(kernel, "# extra kernel command line (console= and bonsai's own keys are added)\ncmdline = {}\n", q(&from.kernel.cmdline));
        let qemu = &from.qemu;
        let mut text = format!(
            r#"# {name}: created from {from} by `cargo xtask new-board`. Edit freely; unknown keys are errors.
# one line shown by `cargo xtask list`
description = {desc}
# CPU architecture: x86_64 or aarch64
arch = {arch}
# Nix system the packages are built for (must match arch)
nix-system = {system}
# Rust target for bonsai-init (static; musl when rustup can install it)
rust-target = {rust}
# kernel console device (ttyS0 on PCs, ttyAMA0 on PL011 UARTs)
console = {console}
# profile built when --profile is not given (profiles/<name>.toml)
profile = {profile}
# initramfs compression: gzip, zstd, xz or none
compression = {compression}

[kernel]
{kernel}
[budget]
# the build fails when an output is larger, naming the largest store paths
"#,
            name = self.name,
            from = self.from,
            desc = q(&format!("{} (from {})", from.description, self.from)),
            arch = q(from.arch.name()),
            system = q(&from.nix_system),
            rust = q(&from.rust_target),
            console = q(&from.console),
            profile = q(&from.profile),
            compression = q(from.compression.name()),
        );
        if let Some(k) = from.budget.kernel {
            let _ = writeln!(text, "kernel = {}", q(&format!("{} KiB", k / 1024)));
        }
        if let Some(i) = from.budget.initramfs {
            let _ = writeln!(text, "initramfs = {}", q(&format!("{} KiB", i / 1024)));
        }
        let _ = write!(
            text,
            r#"
[qemu]
# the QEMU program, machine, CPU, memory and CPUs: the one QEMU command for this board
binary = {binary}
machine = {machine}
{cpu}memory = {memory}
smp = {smp}
{net}# more QEMU arguments, appended verbatim
extra-args = {extra}
# seconds to wait for the guest under TCG
boot-timeout = {timeout}
# QEMU versions this board is known to boot with
known-good = {known}
"#,
            binary = q(&qemu.binary),
            machine = q(&qemu.machine),
            cpu = qemu
                .cpu
                .as_ref()
                .map(|c| format!("cpu = {}\n", q(c)))
                .unwrap_or_default(),
            memory = q(&qemu.memory),
            smp = qemu.smp,
            net = qemu
                .net_device
                .as_ref()
                .map(|d| format!(
                    "# network device for QEMU's user networking (restrict=on)\nnet-device = {}\n",
                    q(d)
                ))
                .unwrap_or_default(),
            extra = list(&qemu.extra_args),
            timeout = qemu.boot_timeout,
            known = list(&qemu.known_good),
        );
        for c in &from.checks {
            let _ = write!(text, "\n# run in the guest by `boot --check`; output judged on the host\n[[check]]\nname = {}\nrun = {}\n", q(&c.name), q(&c.run));
            if let Some(e) = &c.expect {
                let _ = writeln!(text, "expect = {}", q(e));
            }
            if let Some(e) = &c.contains {
                let _ = writeln!(text, "contains = {}", q(e));
            }
        }
        write_new(&board_file, &text)?;
        let readme_text = format!(
            "# {name}\n\n{desc}, started from `{from}`.\n\n- Build: `cargo xtask build --board {name}`\n- Boot: `cargo xtask boot --board {name}` (serial console on the terminal; Ctrl-A X quits)\n- Check: `cargo xtask boot --board {name} --check`\n\nValidated: the board's checks in `boards/{name}.toml` and the profile's. Known-good QEMU: {known}.\n",
            name = self.name,
            desc = from.description,
            from = self.from,
            known = if qemu.known_good.is_empty() { "not recorded yet".into() } else { qemu.known_good.join(", ") }
        );
        write_new(&readme, &readme_text)?;
        // Validate what was written; remove it all again if it does not load.
        if let Err(e) = cfg.load_board(&self.name) {
            for f in [&board_file, &readme, &fragment] {
                let _ = std::fs::remove_file(f);
            }
            return Err(e.context("the generated board does not validate (nothing was kept)"));
        }
        ui::step(format!(
            "created boards/{0}.toml, boards/{0}.md and kernel-configs/{1}",
            self.name, fragment_name
        ));
        println!(
            "next:\n  cargo xtask build --board {0}\n  cargo xtask boot --board {0} --check",
            self.name
        );
        Ok(())
    }
}

fn write_new(path: &PathBuf, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
