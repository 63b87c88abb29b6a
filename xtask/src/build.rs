//! `cargo xtask build --board <b>`: plan, realise with Nix, assemble the root tree, pack,
//! and write `out/<board>/` atomically (kernel, initramfs, manifest.json, build.json).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use rootfs::{ComposeSpec, PackOptions, Tree};

use crate::config::{Board, Config, KernelSource, Profile, INITS};
use crate::nix::{self, Eval, PackageSource};
use crate::{project_root, ui};

#[derive(Args, Debug, Clone, Default)]
pub struct Build {
    /// Board to build (see `cargo xtask list`)
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Profile to build instead of the board's default
    #[arg(long)]
    pub profile: Option<String>,
    /// Init backend instead of the profile's choice
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Use real Nixpkgs (a path or a flake reference) instead of the offline package set;
    /// also settable with BONSAI_NIXPKGS
    #[arg(long)]
    pub nixpkgs: Option<String>,
    /// Output folder (default: out/<board>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run as a step of another command: the summary goes to stderr, stdout stays theirs.
    #[arg(skip)]
    pub nested: bool,
}

/// What a build wrote, kept as out/<board>/build.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildInfo {
    pub board: String,
    pub profile: String,
    pub init: String,
    pub source: String,
    pub kernel: String,
    pub initramfs: String,
    /// The device tree file in the output folder, when the board names one (`kernel.dtb`).
    #[serde(default)]
    pub dtb: Option<String>,
    pub kernel_bytes: u64,
    pub initramfs_bytes: u64,
    pub initramfs_uncompressed_bytes: u64,
    pub files: u64,
    pub store_paths: Vec<String>,
    pub source_date_epoch: u64,
    /// The checks baked into the image, in order (what `boot --check` judges).
    pub checks: Vec<crate::config::CheckSpec>,
    /// Console lines expected while the guest shuts down after the checks.
    #[serde(default)]
    pub shutdown_expect: Vec<String>,
    /// Console lines expected at any time.
    #[serde(default)]
    pub console_expect: Vec<String>,
    /// Hash of everything the build read (see [`fingerprint`]); equal means nothing to do.
    #[serde(default)]
    pub fingerprint: String,
    /// The private key that logs in as root, when bonsai made it (`authorized-keys = "auto"`).
    #[serde(default)]
    pub ssh_key: Option<PathBuf>,
    /// SHA-256 of each output file, to notice a damaged output.
    #[serde(default)]
    pub outputs: std::collections::BTreeMap<String, String>,
    /// A development image (`development = true` in the profile).
    #[serde(default)]
    pub development: bool,
    /// Image paths of the secrets supplied at build time (`[[secrets]]`).
    #[serde(default)]
    pub secrets: Vec<String>,
}

pub struct Built {
    pub out: PathBuf,
    pub info: BuildInfo,
}

impl Build {
    pub fn run(self) -> Result<Built> {
        let timer = ui::Timer::start();
        let root = project_root();
        let cfg = Config::new(&root);
        let board = cfg.load_board(&self.board)?;
        let profile_name = self
            .profile
            .clone()
            .unwrap_or_else(|| board.profile.clone());
        let profile = cfg.load_profile(&profile_name)?;
        let secrets = crate::hygiene::load_secrets(&root, &profile)?;
        crate::hygiene::warn(&profile, &secrets);
        let init = self.init.clone().unwrap_or_else(|| profile.init.clone());
        let backend =
            rootfs::Backend::parse(&init).with_context(|| format!("unknown init '{init}'"))?;
        // Every backend's scripts run on busybox; runit and s6 bring their own package.
        let mut packages = profile.packages.clone();
        for needed in ["busybox"].into_iter().chain(backend.package()) {
            if !packages.iter().any(|p| p == needed) {
                packages.push(needed.to_string());
            }
        }
        let source = match self
            .nixpkgs
            .clone()
            .or_else(|| std::env::var("BONSAI_NIXPKGS").ok())
        {
            Some(r) => PackageSource::Nixpkgs(r),
            None => PackageSource::Offline,
        };
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| root.join("out").join(&board.name));
        // One build per output folder; fails at once when another one holds it.
        let _lock = crate::outdir::lock(&root, &board.name, &out)?;
        let epoch = source_date_epoch(&root)?;
        let fp = fingerprint(&root, &board, &profile, &init, &source, epoch, &secrets)?;
        if let Some(info) = read_info(&out) {
            if fp.as_deref() == Some(info.fingerprint.as_str()) && outputs_intact(&out, &info) {
                summary(
                    self.nested,
                    format!(
                        "{} is up to date: kernel {}, initramfs {} ({:.2} s)",
                        display_rel(&root, &out),
                        ui::size(info.kernel_bytes),
                        ui::size(info.initramfs_bytes),
                        timer.secs()
                    ),
                );
                return Ok(Built { out, info });
            }
        }
        ui::step(format!(
            "build {} (profile {}, init {init}, packages from {})",
            board.name,
            profile.name,
            source.describe()
        ));

        if let (PackageSource::Offline, KernelSource::Build { .. }) =
            (&source, &board.kernel.source)
        {
            crate::host::ensure(crate::host::KERNEL_TOOLS, &[crate::host::LIBELF_HEADER])?;
        }
        // A board of another architecture: its kernel and C programs need the cross compiler.
        if let PackageSource::Offline = &source {
            if let Some((cc, libc)) =
                crate::host::cross_tools(board.arch, crate::offline::host_arch()?)
            {
                crate::host::ensure(&[cc], &[libc])?;
            }
        }
        let eval = Eval::new(&root, &board, &packages, &source)?;

        // The kernel's config first: a dropped option must stop the build before a long compile.
        if let KernelSource::Build { .. } = board.kernel.source {
            ui::step("realise kernel config");
            let cfg_dir = eval
                .build(&["kernelConfig".into()], "kernel config")?
                .remove(0);
            let mut report = nix::read_config_report(&cfg_dir)?;
            if let KernelSource::Build { fragments, .. } = &board.kernel.source {
                for o in &mut report {
                    if let Some(name) = o
                        .fragment
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| fragments.get(i.wrapping_sub(1)))
                    {
                        o.fragment = name.clone();
                    }
                }
            }
            if let Some(bad) = report.iter().find(|o| !o.survived) {
                let why = if bad.reason.is_empty() {
                    String::new()
                } else {
                    format!(" (Kconfig: {})", bad.reason)
                };
                bail!(
                    "kernel option {}={} from kernel-configs/{} was dropped by olddefconfig (it became {}); check its dependencies{why}",
                    bad.option,
                    bad.wanted,
                    bad.fragment,
                    bad.got
                );
            }
        }
        ui::step(format!(
            "realise {} packages and the kernel",
            packages.len()
        ));
        let mut attrs: Vec<String> = (0..packages.len())
            .map(|i| format!("packages.p{i}"))
            .collect();
        attrs.push("kernel".into());
        let mut paths = eval.build(&attrs, "realising packages")?;
        let kernel_pkg = paths.pop().unwrap();
        let kernel_image = nix::kernel_image(&kernel_pkg, board.arch)?;
        let dtb = match &board.kernel.dtb {
            Some(d) => Some(
                nix::kernel_dtb(&kernel_pkg, d)
                    .with_context(|| format!("boards/{}.toml: key 'kernel.dtb'", board.name))?,
            ),
            None => None,
        };

        ui::step("read closure");
        let closure = nix::closure(&paths)?;
        let pid1 = match backend {
            rootfs::Backend::BonsaiInit => Some(crate::pid1::build(&root, &board)?),
            _ => None,
        };
        let mut extra = Vec::new();
        let ssh_key = match &profile.authorized_keys {
            None => None,
            Some(v) => {
                let (public, key) = crate::ssh::authorized_keys(&root, v)?;
                extra.push(("root/.ssh".to_string(), rootfs::Node::dir(0o700)));
                extra.push((
                    "root/.ssh/authorized_keys".to_string(),
                    rootfs::Node::file(rootfs::Source::Bytes(public.into_bytes()), 0o600),
                ));
                key
            }
        };
        for s in &secrets {
            extra.push((
                s.path.trim_start_matches('/').to_string(),
                rootfs::Node::file(rootfs::Source::Bytes(s.data.clone()), s.mode),
            ));
        }
        let (tree, assembly) = assemble(
            &board, &profile, &packages, &paths, &closure, backend, pid1, &extra, &secrets,
        )?;

        let info = write_output(
            &board,
            &profile,
            &init,
            &source,
            &kernel_image,
            dtb.as_deref(),
            &tree,
            &closure,
            epoch,
            &out,
            fp.unwrap_or_default(),
            ssh_key,
            &assembly,
            &secrets,
        )?;
        summary(self.nested, format!(
            "built {}: kernel {}, initramfs {} ({} uncompressed, {} files from {} store paths) in {:.1} s -> {}",
            board.name,
            ui::size(info.kernel_bytes),
            ui::size(info.initramfs_bytes),
            ui::size(info.initramfs_uncompressed_bytes),
            info.files,
            info.store_paths.len(),
            timer.secs(),
            display_rel(&root, &out)
        ));
        Ok(Built { out, info })
    }
}

/// The one-line result of a build: on stdout, or stderr when another command ran the build.
fn summary(nested: bool, line: String) {
    if nested {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

fn display_rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// What went into the image and why: the selection's numbers for the size report.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Assembly {
    /// Per store path and file: closure, kept and image bytes (rootfs::SizeReport).
    pub sizes: serde_json::Value,
    /// Store paths of the closure that nothing kept refers to.
    pub vanished: Vec<String>,
    /// Files whose store references were rewritten away.
    pub rewritten: std::collections::BTreeMap<String, Vec<String>>,
    /// Files and bytes each prune rule removed.
    pub pruned: serde_json::Value,
    /// Why each kept file is there: path -> (referrer, how).
    pub reasons: std::collections::BTreeMap<String, (Option<String>, String)>,
}

/// Compose bonsai's files, then walk from the roots (the packages' programs, the init, the
/// services, `keep` globs) through ELF dependencies, symlinks and store references; prune,
/// strip and verify.
#[allow(clippy::too_many_arguments)]
fn assemble(
    board: &Board,
    profile: &Profile,
    packages: &[String],
    package_paths: &[PathBuf],
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
    backend: rootfs::Backend,
    pid1: Option<PathBuf>,
    extra: &[(String, rootfs::Node)],
    secrets: &[crate::hygiene::Secret],
) -> Result<(Tree, Assembly)> {
    let mut tree = Tree::new();
    let mut bin_links = Vec::new();
    let find = |attr: &str| {
        packages
            .iter()
            .position(|p| p == attr)
            .map(|i| package_paths[i].display().to_string())
    };
    for pkg in package_paths {
        let pkg_s = pkg.display().to_string();
        if let Ok(entries) = fs::read_dir(pkg.join("bin")) {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            for n in names {
                if !n.starts_with('.') {
                    bin_links.push((n.clone(), format!("{pkg_s}/bin/{n}")));
                }
            }
        }
    }
    let busybox = find("busybox").context("the busybox package is missing")?;
    let init = rootfs::InitInputs {
        backend,
        busybox,
        runit: find("runit"),
        s6: find("s6"),
        bonsai_init: pid1,
        faults: crate::conformance::test_faults()?,
    };
    let bin_names: std::collections::BTreeSet<String> =
        bin_links.iter().map(|(n, _)| n.clone()).collect();
    let program_exists = |p: &str| -> bool {
        if let Some(name) = p.strip_prefix("/bin/").or_else(|| p.strip_prefix("/sbin/")) {
            bin_names.contains(name)
                || (name == "bonsai-init" && backend == rootfs::Backend::BonsaiInit)
        } else if p.starts_with("/nix/store/") {
            closure.keys().any(|c| p.starts_with(c.as_str())) && Path::new(p).exists()
        } else if p.starts_with('/') {
            p.starts_with("/etc/bonsai/")
        } else {
            bin_names.contains(p)
        }
    };
    let system = rootfs::system::validate(
        &profile.system,
        &board.name.replace('_', "-"),
        &program_exists,
    )
    .map_err(|e| anyhow::anyhow!("profiles/{}.toml: {e}", profile.name))?;
    let checks = all_checks(board, profile)
        .into_iter()
        .map(|c| (c.name, c.run))
        .collect();
    let spec = ComposeSpec {
        bin_links,
        board: board.name.clone(),
        profile: profile.name.clone(),
        checks,
        system,
        init,
    };
    rootfs::compose(&mut tree, &spec)?;
    for (path, node) in extra {
        tree.insert(path, node.clone())?;
    }

    ui::step(format!("select files from {} store paths", closure.len()));
    let mut roots = Vec::new();
    for (attr, pkg) in packages.iter().zip(package_paths) {
        let bin = pkg.join("bin");
        let root = if bin.is_dir() { bin } else { pkg.clone() };
        roots.push(rootfs::Root::new(
            root.display().to_string(),
            format!("package {attr}"),
        ));
    }
    roots.extend(rootfs::roots_from_tree(&tree)?);
    let closure_paths: Vec<String> = closure.keys().cloned().collect();
    let policy = &profile.policy;
    let problems = |e: rootfs::Error| -> anyhow::Error {
        match e {
            rootfs::Error::Problems { step, problems } => {
                let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
                let plural = if problems.len() == 1 { "" } else { "s" };
                anyhow::anyhow!(
                    "{step} found {} problem{plural} in profile {}:\n{}",
                    problems.len(),
                    profile.name,
                    lines.join("\n")
                )
            }
            other => other.into(),
        }
    };
    let selection = rootfs::select(&rootfs::SelectSpec {
        store_root: Path::new("/"),
        closure: &closure_paths,
        roots: &roots,
        policy,
    })
    .map_err(problems)?;
    for w in &selection.warnings {
        ui::warn(w.to_string());
    }
    let report = rootfs::populate(&mut tree, &selection, policy)?;
    for w in &report.warnings {
        ui::warn(w.to_string());
    }
    rootfs::verify(&tree, policy).map_err(problems)?;
    crate::hygiene::check(&tree, profile, &spec.system, secrets)?;
    let vanished: Vec<String> = selection
        .vanished_store_paths()
        .into_iter()
        .map(|s| s.to_string())
        .collect();
    if !vanished.is_empty() {
        ui::detail(format!(
            "{} store paths of the closure vanished (nothing kept refers to them)",
            vanished.len()
        ));
    }
    let reasons = selection
        .entries
        .iter()
        .map(|(p, k)| (p.clone(), (k.reason.from.clone(), k.reason.how.to_string())))
        .collect();
    let assembly = Assembly {
        sizes: serde_json::to_value(&report.sizes)?,
        vanished,
        rewritten: report.rewritten.clone(),
        pruned: serde_json::to_value(&selection.pruned)?,
        reasons,
    };
    Ok((tree, assembly))
}

/// The board's checks, then the profile's.
pub fn all_checks(board: &Board, profile: &Profile) -> Vec<crate::config::CheckSpec> {
    board
        .checks
        .iter()
        .chain(&profile.checks)
        .cloned()
        .collect()
}

/// SOURCE_DATE_EPOCH from the environment, else the last commit's time, else 0.
pub fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v} is not a number of seconds"));
    }
    let out = std::process::Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output();
    Ok(out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0))
}

#[allow(clippy::too_many_arguments)]
fn write_output(
    board: &Board,
    profile: &Profile,
    init: &str,
    source: &PackageSource,
    kernel_image: &Path,
    dtb: Option<&Path>,
    tree: &Tree,
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
    epoch: u64,
    out: &Path,
    fingerprint: String,
    ssh_key: Option<PathBuf>,
    assembly: &Assembly,
    secrets: &[crate::hygiene::Secret],
) -> Result<BuildInfo> {
    let parent = out.parent().context("output folder has no parent")?;
    fs::create_dir_all(parent)
        .with_context(|| format!("cannot create output folder {}", parent.display()))?;
    let name = out
        .file_name()
        .context("output folder has no name")?
        .to_string_lossy()
        .to_string();
    // Everything is written into a fresh folder beside the output, then swapped in.
    let stage = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)
        .with_context(|| format!("cannot write to output folder {}", parent.display()))?;
    // Removed on SIGINT/SIGTERM/SIGHUP too, which run no destructors.
    let staged = crate::outdir::track_stage(stage.path());

    // Which output file is being written, for a disk-full error.
    let writing = std::cell::RefCell::new(String::from("kernel"));
    let staged_result = (|| -> Result<BuildInfo> {
        let kernel_bytes = fs::metadata(kernel_image)?.len();
        if let Some(max) = board.budget.kernel {
            if kernel_bytes > max {
                bail!("boards/{}.toml: budget.kernel: kernel is {} ({kernel_bytes} B), over the budget of {} ({max} B)", board.name, ui::size(kernel_bytes), ui::size(max));
            }
        }
        writing.replace("kernel".into());
        fs::copy(kernel_image, stage.path().join("kernel")).context("copying the kernel")?;
        let mut perms = fs::metadata(stage.path().join("kernel"))?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        fs::set_permissions(stage.path().join("kernel"), perms)?;
        let dtb_name = match dtb {
            Some(d) => {
                let name = d
                    .file_name()
                    .context("device tree path has no file name")?
                    .to_string_lossy()
                    .to_string();
                writing.replace(name.clone());
                fs::write(stage.path().join(&name), fs::read(d)?)
                    .context("copying the device tree")?;
                Some(name)
            }
            None => None,
        };

        ui::step(format!(
            "pack initramfs ({}, {} entries)",
            board.compression.name(),
            tree.len()
        ));
        let initramfs_name = board.compression.file_name();
        let mtime = u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit a cpio mtime")?;
        writing.replace(initramfs_name.into());
        // A secret's bytes must not land in a shared cache: such images are packed without it.
        let cache = if secrets.is_empty() {
            pack_cache(board.compression)?
        } else {
            ui::detail("pack cache: not used (the image holds secrets)");
            None
        };
        let report = rootfs::pack_cached(
            tree,
            &PackOptions {
                compression: board.compression,
                level: None,
                mtime,
            },
            &stage.path().join(initramfs_name),
            cache.clone(),
        )?;
        if let Some(cache) = &cache {
            report_pack_cache(cache);
            prune_pack_cache(cache);
        }
        if !secrets.is_empty() {
            // Readable by the owner only, like the secrets' own sources should be.
            fs::set_permissions(
                stage.path().join(initramfs_name),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
        }
        crate::outdir::test_delay("BONSAI_TEST_PACK_DELAY_MS");
        if let Some(max) = board.budget.initramfs {
            if report.compressed_bytes > max {
                let mut top: Vec<(u64, String)> = assembly
                    .sizes
                    .get("store_paths")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|sp| {
                                Some((
                                    sp.get("image_bytes")?.as_u64()?,
                                    sp.get("store_path")?.as_str()?.to_string(),
                                ))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                top.sort_by(|a, b| b.cmp(a));
                let offenders: Vec<String> = top
                    .iter()
                    .take(3)
                    .map(|(b, p)| format!("{p} {}", ui::size(*b)))
                    .collect();
                bail!(
                    "boards/{}.toml: budget.initramfs: initramfs is {}, over the budget of {}; largest: {}",
                    board.name,
                    ui::size(report.compressed_bytes),
                    ui::size(max),
                    offenders.join(", ")
                );
            }
        }
        let mut manifest = rootfs::manifest(tree)?;
        manifest.development = profile.development;
        manifest.secrets = crate::hygiene::secret_paths(secrets);
        manifest.holds_secrets = !manifest.secrets.is_empty();
        writing.replace("manifest.json".into());
        fs::write(stage.path().join("manifest.json"), manifest.to_json())?;
        writing.replace("selection.json".into());
        fs::write(
            stage.path().join("selection.json"),
            serde_json::to_string_pretty(assembly)? + "\n",
        )?;
        let info = BuildInfo {
            board: board.name.clone(),
            profile: profile.name.clone(),
            init: init.to_string(),
            source: source.describe(),
            kernel: "kernel".into(),
            initramfs: initramfs_name.into(),
            dtb: dtb_name.clone(),
            kernel_bytes,
            initramfs_bytes: report.compressed_bytes,
            initramfs_uncompressed_bytes: report.cpio.archive_bytes,
            files: manifest.totals.files,
            store_paths: closure
                .keys()
                .filter(|k| !assembly.vanished.contains(k))
                .cloned()
                .collect(),
            source_date_epoch: epoch,
            checks: all_checks(board, profile),
            shutdown_expect: profile.shutdown_expect.clone(),
            console_expect: profile.console_expect.clone(),
            fingerprint,
            ssh_key: ssh_key.clone(),
            outputs: ["kernel", initramfs_name, "manifest.json"]
                .iter()
                .copied()
                .chain(dtb_name.as_deref())
                .map(|f| {
                    Ok((
                        f.to_string(),
                        crate::offline::sha256_file(&stage.path().join(f))?,
                    ))
                })
                .collect::<Result<_>>()?,
            development: profile.development,
            secrets: crate::hygiene::secret_paths(secrets),
        };
        writing.replace("build.json".into());
        fs::write(
            stage.path().join("build.json"),
            serde_json::to_string_pretty(&info)? + "\n",
        )?;
        Ok(info)
    })();
    let info = staged_result.map_err(|e| {
        if crate::hygiene::is_disk_full(&e) {
            disk_full(out, &writing.borrow(), kernel_image, tree)
        } else {
            e
        }
    })?;

    // Swap the new folder in; the old one is removed only once the new one is in place.
    let stage = stage.keep();
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    crate::outdir::uninterrupted(|| -> Result<()> {
        if out.exists() {
            fs::rename(out, &old)
                .with_context(|| format!("moving the previous {} aside", out.display()))?;
        }
        if let Err(e) = fs::rename(&stage, out) {
            let _ = fs::rename(&old, out);
            let _ = fs::remove_dir_all(&stage);
            return Err(e).with_context(|| format!("moving the new output into {}", out.display()));
        }
        drop(staged); // swapped in: nothing left for an interrupt to remove
        Ok(())
    })?;
    let _ = fs::remove_dir_all(&old);
    Ok(info)
}

/// The error of a build that filled its output's file system (the stage folder is removed
/// when the caller returns it).
fn disk_full(out: &Path, file: &str, kernel_image: &Path, tree: &Tree) -> anyhow::Error {
    let kernel = fs::metadata(kernel_image).map(|m| m.len()).unwrap_or(0);
    let image: u64 = tree
        .iter()
        .map(|(_, n)| match &n.kind {
            rootfs::NodeKind::File {
                source: rootfs::Source::Bytes(b),
            } => b.len() as u64,
            rootfs::NodeKind::File {
                source: rootfs::Source::Host(h),
            } => fs::metadata(h).map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum();
    anyhow::anyhow!(
        "writing {}: no space left on device (kernel {}, image {} before compression); the unfinished output was removed, the previous one is unchanged",
        out.join(file).display(),
        ui::size(kernel),
        ui::size(image)
    )
}

/// A hash of every input of a build that bonsai can see without asking Nix: the board and
/// profile files (with parents), kernel fragments, the Nix expressions and Debian pins, the
/// init, the C toolchain, SOURCE_DATE_EPOCH and the xtask binary itself. `None` when the
/// package source cannot be fingerprinted (a Nixpkgs checkout or flake may change under us).
pub fn fingerprint(
    root: &Path,
    board: &Board,
    profile: &Profile,
    init: &str,
    source: &PackageSource,
    epoch: u64,
    secrets: &[crate::hygiene::Secret],
) -> Result<Option<String>> {
    use sha2::{Digest, Sha256};
    if !matches!(source, PackageSource::Offline) {
        return Ok(None);
    }
    let mut h = Sha256::new();
    let add_file = |h: &mut Sha256, p: &Path| -> Result<()> {
        h.update(
            p.strip_prefix(root)
                .unwrap_or(p)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update([0]);
        h.update(fs::read(p).with_context(|| format!("reading {}", p.display()))?);
        h.update([0]);
        Ok(())
    };
    add_file(&mut h, &board.file)?;
    let cfg = Config::new(root);
    for name in profile
        .ancestors
        .iter()
        .chain(std::iter::once(&profile.name))
    {
        add_file(&mut h, &cfg.profiles_dir().join(format!("{name}.toml")))?;
    }
    if let KernelSource::Build { fragments, .. } = &board.kernel.source {
        for f in fragments {
            add_file(&mut h, &root.join("kernel-configs").join(f))?;
        }
    }
    let mut nix_files = Vec::new();
    collect_files(&root.join("nix"), &mut nix_files)?;
    nix_files.sort();
    for f in &nix_files {
        add_file(&mut h, f)?;
    }
    h.update(format!("init={init}\nepoch={epoch}\n").as_bytes());
    // The judge's negative tests build deliberately broken backends (BONSAI_TEST_BROKEN).
    h.update(format!("faults={:?}\n", crate::conformance::test_faults()?).as_bytes());
    // Secrets come from outside the repository: a changed one is a changed input.
    for secret in secrets {
        h.update(format!("secret={} {:o}\n", secret.path, secret.mode).as_bytes());
        h.update(Sha256::digest(&secret.data));
    }
    h.update(
        crate::host::version_line("gcc")
            .unwrap_or_default()
            .as_bytes(),
    );
    if let Some((cc, _)) = crate::offline::host_arch()
        .ok()
        .and_then(|h| crate::host::cross_tools(board.arch, h))
    {
        h.update(
            crate::host::version_line(cc.program)
                .unwrap_or_default()
                .as_bytes(),
        );
    }
    // The running binary (through /proc, which works even after cargo replaced the file).
    add_file(&mut h, Path::new("/proc/self/exe"))?;
    Ok(Some(crate::offline::hex(&h.finalize())))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Every output file is there with the hash recorded at build time.
fn outputs_intact(out: &Path, info: &BuildInfo) -> bool {
    !info.outputs.is_empty()
        && info.outputs.iter().all(|(f, sum)| {
            crate::offline::sha256_file(&out.join(f))
                .map(|s| &s == sum)
                .unwrap_or(false)
        })
}

/// Reads out/<board>/build.json.
pub fn read_info(out: &Path) -> Option<BuildInfo> {
    let text = fs::read_to_string(out.join("build.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Environment variable: `off` turns the pack cache off, a path moves it (default:
/// `<bonsai cache>/pack`).
pub const PACK_CACHE_ENV: &str = "BONSAI_PACK_CACHE";
/// Environment variable: the pack cache's size limit (`512M`, `2G`; default 512 MiB).
pub const PACK_CACHE_MAX_ENV: &str = "BONSAI_PACK_CACHE_MAX";
const PACK_CACHE_DEFAULT_MAX: u64 = 512 << 20;

/// The cache of compressed gzip pieces, unless it is turned off or the image is not gzip.
fn pack_cache(compression: rootfs::Compression) -> Result<Option<Arc<rootfs::PieceCache>>> {
    let setting = std::env::var_os(PACK_CACHE_ENV);
    if compression != rootfs::Compression::Gzip || setting.as_deref() == Some("off".as_ref()) {
        return Ok(None);
    }
    let dir = match setting {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => crate::offline::cache_dir().join("pack"),
    };
    // The folder first: the executable's hash is remembered in it.
    let _ = fs::create_dir_all(&dir);
    let salt = compressor_salt(&dir)?;
    let cache = rootfs::PieceCache::open(&dir, &salt)
        .with_context(|| format!("{PACK_CACHE_ENV}: cannot use {} as the pack cache (set {PACK_CACHE_ENV}=off to pack without one)", dir.display()))?;
    Ok(Some(Arc::new(cache)))
}

/// What identifies the compressor's code in cache keys: the SHA-256 of this executable, so
/// that a rebuilt bonsai (perhaps with another zlib) never reads pieces an older one wrote.
/// Hashing the executable costs about 9 ms a build, so the hash is remembered in the cache
/// folder ([`EXE_HASH_MEMO`]) next to the executable's device, inode, size and modification
/// time, and computed again whenever any of them differs (as ccache checks its compilers).
fn compressor_salt(dir: &Path) -> Result<Vec<u8>> {
    static SALT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    if let Some(s) = SALT.get() {
        return Ok(s.clone());
    }
    // /proc/self/exe still opens when cargo has replaced the file since this process started.
    let exe = if Path::new("/proc/self/exe").exists() {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().context("finding the bonsai executable")?
    };
    let salt = exe_hash(&exe, &dir.join(EXE_HASH_MEMO))
        .context("reading the bonsai executable (its hash keys the pack cache)")?;
    Ok(SALT.get_or_init(|| salt.to_vec()).clone())
}

/// The file in the pack cache folder that remembers the executable's hash.
const EXE_HASH_MEMO: &str = "exe-sha256";

/// SHA-256 of the file `exe`, taken from `memo` when that was written for a file with the
/// same device, inode, size and modification time (to the nanosecond); otherwise computed
/// and written there (a failure to write only costs the next build the time again).
fn exe_hash(exe: &Path, memo: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(exe)?;
    let stamp = format!(
        "{} {} {} {}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    );
    let remembered = fs::read_to_string(memo).ok().and_then(|text| {
        let (s, hex) = text.trim_end().rsplit_once(' ')?;
        (s == stamp).then(|| parse_hex32(hex)).flatten()
    });
    if let Some(hash) = remembered {
        return Ok(hash);
    }
    let hash: [u8; 32] = sha2::Sha256::digest(fs::read(exe)?).into();
    let hex = crate::offline::hex(&hash);
    let temp = memo.with_extension(format!("tmp-{}", std::process::id()));
    if fs::write(&temp, format!("{stamp} {hex}\n")).is_ok() && fs::rename(&temp, memo).is_err() {
        let _ = fs::remove_file(&temp);
    }
    Ok(hash)
}

/// 64 hex digits as 32 bytes.
fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// One line on what the pack cache did, and warnings for damaged entries and failed writes.
fn report_pack_cache(cache: &rootfs::PieceCache) {
    let s = cache.stats();
    ui::detail(format!(
        "pack cache: {} of {} pieces reused ({} of data), {} compressed",
        s.hits,
        s.hits + s.misses,
        ui::size(s.reused_bytes),
        s.misses
    ));
    let corrupt = cache.corrupt_entries();
    for (path, why) in corrupt.iter().take(3) {
        ui::warn(format!(
            "pack cache entry {} was damaged ({why}): deleted and compressed again",
            path.display()
        ));
    }
    if corrupt.len() > 3 {
        ui::warn(format!(
            "... and {} more damaged pack cache entries",
            corrupt.len() - 3
        ));
    }
    if let Some(first) = cache.first_write_error() {
        ui::warn(format!(
            "pack cache: {} pieces not stored (first: {first}); the image is complete, the next build packs them again",
            s.write_errors
        ));
    }
}

/// Keeps the pack cache under `BONSAI_PACK_CACHE_MAX`, least recently used pieces first.
/// A build that stored nothing new cannot have grown it, and skips the walk.
fn prune_pack_cache(cache: &rootfs::PieceCache) {
    if cache.stats().stored == 0 {
        return;
    }
    let max = match std::env::var(PACK_CACHE_MAX_ENV) {
        Ok(v) => match crate::config::parse_size(&v) {
            Some(n) => n,
            None => {
                ui::warn(format!(
                    "{PACK_CACHE_MAX_ENV}={v:?} is not a size (like 512M); using 512 MiB"
                ));
                PACK_CACHE_DEFAULT_MAX
            }
        },
        Err(_) => PACK_CACHE_DEFAULT_MAX,
    };
    match cache.prune(max) {
        Ok(r) if r.removed > 0 => ui::detail(format!(
            "pack cache: removed {} old pieces ({}), {} kept",
            r.removed,
            ui::size(r.removed_bytes),
            ui::size(r.kept_bytes)
        )),
        Ok(_) => {}
        Err(e) => ui::warn(format!("pack cache: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The executable's hash is remembered, and computed again when the file changes.
    #[test]
    fn exe_hash_is_remembered_until_the_file_changes() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("exe");
        let memo = dir.path().join(EXE_HASH_MEMO);
        fs::write(&exe, b"version one").unwrap();
        let one: [u8; 32] = sha2::Sha256::digest(b"version one").into();
        assert_eq!(exe_hash(&exe, &memo).unwrap(), one);
        let text = fs::read_to_string(&memo).unwrap();
        assert!(text.ends_with(&format!("{}\n", crate::offline::hex(&one))));
        // Remembered: a memo that says otherwise for the same stamp is believed.
        let (stamp, _) = text.trim_end().rsplit_once(' ').unwrap();
        fs::write(&memo, format!("{stamp} {}\n", "ab".repeat(32))).unwrap();
        assert_eq!(exe_hash(&exe, &memo).unwrap(), [0xab; 32]);
        // A new file (new size and mtime) is hashed again, and the memo follows.
        fs::write(&exe, b"version two, longer").unwrap();
        let two: [u8; 32] = sha2::Sha256::digest(b"version two, longer").into();
        assert_eq!(exe_hash(&exe, &memo).unwrap(), two);
        assert_eq!(exe_hash(&exe, &memo).unwrap(), two);
        // A damaged memo is ignored.
        fs::write(&memo, "garbage").unwrap();
        assert_eq!(exe_hash(&exe, &memo).unwrap(), two);
        assert_eq!(parse_hex32("zz"), None);
    }
}
