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
    /// Build nothing on this machine: everything comes from the binary caches in bonsai.toml
    /// or is built on its remote builders; fails naming each derivation that would be built
    /// here
    #[arg(long)]
    pub no_local_builds: bool,
    /// The public key (minisign format) bonsai-update checks bundles against, built into the
    /// image with the board's name (`cargo xtask bundle`).
    #[arg(skip)]
    pub update_key: Option<String>,
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
    /// The profile's `[test-machine]`: what QEMU adds when the checks run.
    #[serde(default)]
    pub test_machine: crate::config::TestMachine,
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
    /// The public key built in for bonsai-update (`cargo xtask bundle`), if any.
    #[serde(default)]
    pub update_key: Option<String>,
    /// The Nix that built it, the Nixpkgs it used, and the kernel's store paths.
    #[serde(default)]
    pub nix: NixRecord,
    /// `[image] forbid` in force: store path name globs the image was checked not to hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbid: Vec<String>,
    /// `[overrides.<attribute>]` in force: attribute -> argument -> value and profile.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub overrides: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::OverrideArg>,
    >,
}

/// Where an output's store paths came from (`build.json`'s `nix`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NixRecord {
    /// `nix --version` of the Nix that built it, and which one it was (`host`, `debian13`, `dir`).
    pub version: String,
    pub kind: String,
    /// The Nixpkgs it was built from (a checkout's absolute path or a flake reference);
    /// `None` for the offline set.
    pub nixpkgs: Option<String>,
    /// The kernel package's store path.
    pub kernel: Option<String>,
    /// How the kernel was configured: `<base> + kernel-configs/<fragment>...`, or `package <attr>`.
    pub kernel_config: String,
    /// The merged config's store path (`kernelConfig`; the file is its `config`) and the
    /// file's SHA-256, for a kernel built from fragments.
    pub kernel_config_path: Option<String>,
    pub kernel_config_sha256: Option<String>,
    /// bonsai-init's store path (`/nix/store/…-bonsai-init-<version>-<target>`), when the
    /// image holds bonsai-init.
    #[serde(default)]
    pub bonsai_init: Option<String>,
}

pub struct Built {
    pub out: PathBuf,
    pub info: BuildInfo,
}

impl Build {
    /// Builds the board's image: resolves the plan, and unless its output is up to date,
    /// realises the packages and the kernel with Nix, selects the image's files and writes
    /// `out/<board>/`.
    pub fn run(self) -> Result<Built> {
        let timer = ui::Timer::start();
        // An interrupt at any step (Nix, selection, packing) ends the build the same way.
        crate::outdir::install_handler();
        let (plan, _lock) = self.plan()?;
        let (root, board) = (&plan.root, &plan.board);
        let fp = fingerprint(
            root,
            board,
            &plan.profile,
            &plan.init,
            &plan.source,
            plan.epoch,
            &plan.secrets,
            plan.update_key.as_deref(),
        )?;
        if let Some(info) = plan.up_to_date(fp.as_deref()) {
            summary(
                self.nested,
                format!(
                    "{} is up to date: kernel {}, initramfs {} ({:.2} s)",
                    display_rel(root, &plan.out),
                    ui::size(info.kernel_bytes),
                    ui::size(info.initramfs_bytes),
                    timer.secs()
                ),
            );
            return Ok(Built {
                out: plan.out,
                info,
            });
        }
        ui::step(format!(
            "build {} (profile {}, init {}, packages from {})",
            board.name,
            plan.profile.name,
            plan.init,
            plan.source.describe()
        ));
        let mut record = plan.nix_record()?;
        plan.ensure_host_tools()?;
        let eval = Eval::for_profile(root, board, &plan.packages, &plan.profile, &plan.source)?;
        if self.no_local_builds {
            no_local_builds(&eval, &plan)?;
        }
        // The kernel's config first: a dropped option must stop the build before a long compile.
        if let KernelSource::Build { fragments, .. } = &board.kernel.source {
            realise_kernel_config(&eval, fragments, &mut record)?;
        }
        let realised = plan.realise(&eval, &mut record)?;
        let image = plan.select(realised)?;
        record.bonsai_init = image.bonsai_init.clone();

        let info = write_output(&plan, &image, fp.unwrap_or_default(), record)?;
        summary(self.nested, format!(
            "built {}: kernel {}, initramfs {} ({} uncompressed, {} files from {} store paths) in {:.1} s -> {}",
            board.name,
            ui::size(info.kernel_bytes),
            ui::size(info.initramfs_bytes),
            ui::size(info.initramfs_uncompressed_bytes),
            info.files,
            info.store_paths.len(),
            timer.secs(),
            display_rel(root, &plan.out)
        ));
        Ok(Built {
            out: plan.out,
            info,
        })
    }

    /// Resolves what to build from the command line: the board, the profile (`--profile`,
    /// else the board's) and its secrets (warning about them and about development images),
    /// the init and the packages it needs, the package source and the output folder, which
    /// it locks (one build per folder); then SOURCE_DATE_EPOCH.
    fn plan(&self) -> Result<(Plan, crate::outdir::OutLock)> {
        let root = project_root();
        crate::settings::load(&root)?;
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
        let packages = packages_for(&profile, backend);
        let source = PackageSource::from_request(self.nixpkgs.as_deref())?;
        let out = self
            .out
            .clone()
            .unwrap_or_else(|| crate::out_root().join(&board.name));
        // One build per output folder; fails at once when another one holds it.
        let lock = crate::outdir::lock(&root, &board.name, &out)?;
        let epoch = source_date_epoch(&root)?;
        let plan = Plan {
            root,
            board,
            profile,
            init,
            backend,
            packages,
            source,
            secrets,
            epoch,
            out,
            update_key: self.update_key.clone(),
        };
        Ok((plan, lock))
    }
}

/// `--no-local-builds`: Nix runs with `max-jobs = 0` from here on, and the build stops first,
/// naming the derivations, when Nix would build any of them on this machine (no remote builder
/// is set) or when a cache's copy of a path it would fetch is not signed by a trusted key.
fn no_local_builds(eval: &Eval, plan: &Plan) -> Result<()> {
    crate::settings::forbid_local_builds();
    let settings = crate::settings::current();
    let mut attrs: Vec<String> = (0..plan.packages.len())
        .map(|i| format!("packages.p{i}"))
        .collect();
    if matches!(plan.board.kernel.source, KernelSource::Build { .. }) {
        attrs.push("kernelConfig".into());
    }
    attrs.push("kernel".into());
    if !plan.profile.system.kernel.modules.is_empty() {
        attrs.push("kernel.modules".into());
    }
    ui::step("check that nothing would be built on this machine (--no-local-builds)");
    // The outputs the build reads (nix-instantiate names one when it is not `out`), not every
    // output: a cache need not hold a kernel's `dev`.
    let drvs: Vec<String> = eval
        .instantiate_without_ifd(&attrs, "evaluating")?
        .into_iter()
        .map(|(d, o)| format!("{d}!{}", o.unwrap_or_else(|| "out".into())))
        .collect();
    let (built, fetched) = crate::eval::dry_run_both(&drvs)?;
    if !built.is_empty() && settings.builders.is_empty() {
        let names: Vec<String> = built.iter().map(|d| crate::forbid::short(d)).collect();
        bail!(
            "--no-local-builds: {} derivation{} would be built on this machine, and {} sets no remote builder: {} (cargo xtask cache status --from <cache> shows what the cache lacks)",
            built.len(),
            if built.len() == 1 { "" } else { "s" },
            settings.origin,
            names.join(", ")
        );
    }
    for p in &fetched {
        crate::teamcache::check_trusted(p, &settings.substituters)?;
    }
    if !built.is_empty() {
        ui::detail(format!(
            "{} derivations go to the remote builders (max-jobs = 0 here)",
            built.len()
        ));
    }
    Ok(())
}

/// What a build is for: the board, profile and init it was resolved to, the packages it
/// realises and where they come from, the secrets it holds, its time stamp and its output
/// folder.
struct Plan {
    /// The project root (`project_root()`).
    root: PathBuf,
    board: Board,
    profile: Profile,
    /// The init backend's name (`--init`, else the profile's).
    init: String,
    backend: rootfs::Backend,
    /// The package attributes to realise ([`packages_for`]).
    packages: Vec<String>,
    source: PackageSource,
    secrets: Vec<crate::hygiene::Secret>,
    /// SOURCE_DATE_EPOCH: the time of every file in the archive, and build.json's.
    epoch: u64,
    /// [`Build::update_key`].
    update_key: Option<String>,
    out: PathBuf,
}

/// A file or folder the profile adds to the image, by its path there (no leading `/`).
type ExtraFile = (String, rootfs::Node);

/// What Nix realised for a build: the packages' store paths (in the plan's order), and the
/// kernel's image and the board's device tree in the kernel package.
struct Realised {
    packages: Vec<PathBuf>,
    kernel_image: PathBuf,
    dtb: Option<PathBuf>,
    /// The kernel's `modules` output, when the profile names modules.
    modules: Option<PathBuf>,
}

impl Plan {
    /// The output's build.json when there is nothing to do: the same fingerprint and every
    /// output file intact, for the offline set only (a Nixpkgs checkout or flake may change
    /// under us: only Nix can say it is current).
    fn up_to_date(&self, fp: Option<&str>) -> Option<BuildInfo> {
        let info = read_info(&self.out)?;
        let current = matches!(self.source, PackageSource::Offline)
            && fp == Some(info.fingerprint.as_str())
            && outputs_intact(&self.out, &info);
        current.then_some(info)
    }

    /// Chooses the Nix that builds ([`crate::nixbin::select`]: real Nixpkgs needs Nix >= 2.18)
    /// and starts build.json's record of it, with how the kernel is configured.
    fn nix_record(&self) -> Result<NixRecord> {
        let nix_used = crate::nixbin::select(matches!(self.source, PackageSource::Nixpkgs(_)))?;
        ui::step(format!("nix: {} ({})", nix_used.version, nix_used.kind));
        Ok(NixRecord {
            version: nix_used.version.clone(),
            kind: nix_used.kind.into(),
            nixpkgs: self.source.nixpkgs_ref(),
            kernel: None,
            kernel_config: match &self.board.kernel.source {
                KernelSource::Build { base, fragments } => std::iter::once(base.clone())
                    .chain(fragments.iter().map(|f| format!("kernel-configs/{f}")))
                    .collect::<Vec<_>>()
                    .join(" + "),
                KernelSource::Package(p) => format!("package {p}"),
            },
            kernel_config_path: None,
            kernel_config_sha256: None,
            bonsai_init: None,
        })
    }

    /// Makes sure the host has what the offline set builds with: the kernel's build tools
    /// when it builds the kernel, and the cross compiler for a board of another architecture
    /// (its kernel and C programs need it).
    fn ensure_host_tools(&self) -> Result<()> {
        let PackageSource::Offline = &self.source else {
            return Ok(());
        };
        if let KernelSource::Build { .. } = &self.board.kernel.source {
            crate::host::ensure(crate::host::KERNEL_TOOLS, &[crate::host::LIBELF_HEADER])?;
        }
        if let Some((cc, libc)) =
            crate::host::cross_tools(self.board.arch, crate::host::host_arch()?)
        {
            crate::host::ensure(&[cc], &[libc])?;
        }
        Ok(())
    }

    /// Realises the packages and the kernel in one Nix build, records the kernel's store
    /// path, and finds the kernel image and the board's device tree in it.
    fn realise(&self, eval: &Eval, record: &mut NixRecord) -> Result<Realised> {
        let board = &self.board;
        ui::step(format!(
            "realise {} packages and the kernel",
            self.packages.len()
        ));
        let mut attrs: Vec<String> = (0..self.packages.len())
            .map(|i| format!("packages.p{i}"))
            .collect();
        attrs.push("kernel".into());
        let want_modules = !self.profile.system.kernel.modules.is_empty();
        if want_modules {
            if let KernelSource::Build { fragments, .. } = &board.kernel.source {
                if !nix::modular(&self.root.join("kernel-configs"), fragments) {
                    bail!(
                        "profiles/{}.toml: key 'kernel.modules': the kernel of boards/{}.toml is not modular (no fragment sets CONFIG_MODULES=y)",
                        self.profile.name,
                        board.name
                    );
                }
            }
            attrs.push("kernel.modules".into());
        }
        let mut packages = eval.build(&attrs, "realising packages")?;
        let modules = if want_modules { packages.pop() } else { None };
        let kernel_pkg = packages.pop().unwrap();
        record.kernel = Some(kernel_pkg.display().to_string());
        let kernel_image = nix::kernel_image(&kernel_pkg, board.arch)?;
        let dtb = match &board.kernel.dtb {
            Some(d) => Some(
                nix::kernel_dtb(&kernel_pkg, d)
                    .with_context(|| format!("boards/{}.toml: key 'kernel.dtb'", board.name))?,
            ),
            None => None,
        };
        Ok(Realised {
            packages,
            kernel_image,
            dtb,
            modules,
        })
    }

    /// Reads the packages' closure, builds bonsai-init when it is the init, and assembles the
    /// image tree with root's login key and the secrets in it.
    fn select(&self, realised: Realised) -> Result<Image> {
        ui::step("read closure");
        let closure = nix::closure(&realised.packages)?;
        // bonsai-init: the init, and bonsai-update in an image that takes updates.
        // It comes from its store path (`pid1::store_path`), which the record names.
        let store = if self.backend == rootfs::Backend::BonsaiInit || self.update_key.is_some() {
            Some(crate::pid1::store_path(
                &crate::source_root(&self.root),
                &self.board,
            )?)
        } else {
            None
        };
        let binary = store.as_ref().map(|s| s.join("bin/bonsai-init"));
        let pid1 = binary
            .clone()
            .filter(|_| self.backend == rootfs::Backend::BonsaiInit);
        let (mut extra, ssh_key) = self.extra_files()?;
        let mut asked = Vec::new();
        if let Some(m) = &realised.modules {
            let (files, kept) = crate::kmod::image_files(m, &self.profile.system.kernel.modules)
                .with_context(|| {
                    format!("profiles/{}.toml: key 'kernel.modules'", self.profile.name)
                })?;
            ui::detail(format!("kernel modules: {}", kept.join(", ")));
            asked = crate::kmod::firmware_asked(&files)?;
            extra.extend(files);
        }
        let (firmware, warnings) =
            crate::kmod::firmware_files(&realised.packages, &self.profile.firmware, &asked)
                .with_context(|| format!("profiles/{}.toml", self.profile.name))?;
        for w in warnings {
            ui::warn(w);
        }
        if !firmware.is_empty() {
            let names: Vec<&str> = firmware.iter().map(|(p, _)| p.as_str()).collect();
            ui::detail(format!("firmware: {}", names.join(", ")));
        }
        extra.extend(firmware);
        if let (Some(bin), Some(_)) = (&binary, &self.update_key) {
            let node = match self.backend {
                rootfs::Backend::BonsaiInit => rootfs::Node::symlink("bonsai-init"),
                _ => rootfs::Node::file(rootfs::Source::Host(bin.clone()), 0o755),
            };
            extra.push(("bin/bonsai-update".to_string(), node));
        }
        let (tree, assembly) = assemble(self, &realised.packages, &closure, pid1, &extra)?;
        Ok(Image {
            kernel: realised.kernel_image,
            dtb: realised.dtb,
            tree,
            closure,
            assembly,
            ssh_key,
            bonsai_init: store.map(|s| s.display().to_string()),
        })
    }

    /// The files the profile adds to the image: root's `authorized_keys` (with the private key
    /// that logs in, when bonsai made it) and the secrets.
    fn extra_files(&self) -> Result<(Vec<ExtraFile>, Option<PathBuf>)> {
        let mut extra = Vec::new();
        let ssh_key = match &self.profile.authorized_keys {
            None => None,
            Some(v) => {
                let (public, key) = crate::ssh::authorized_keys(&self.root, v)?;
                extra.push(("root/.ssh".to_string(), rootfs::Node::dir(0o700)));
                extra.push((
                    "root/.ssh/authorized_keys".to_string(),
                    rootfs::Node::file(rootfs::Source::Bytes(public.into_bytes()), 0o600),
                ));
                key
            }
        };
        if let Some(key) = &self.update_key {
            extra.push((
                crate::update::IMAGE_KEY.to_string(),
                rootfs::Node::file(rootfs::Source::Bytes(key.clone().into_bytes()), 0o644),
            ));
            extra.push((
                crate::update::IMAGE_CONF.to_string(),
                rootfs::Node::file(
                    rootfs::Source::Bytes(
                        format!(
                            "board={}\ntries={}\n",
                            self.board.name,
                            self.board.disk.as_ref().map(|d| d.tries).unwrap_or(3)
                        )
                        .into_bytes(),
                    ),
                    0o644,
                ),
            ));
        }
        for s in &self.secrets {
            extra.push((
                s.path.trim_start_matches('/').to_string(),
                rootfs::Node::file(rootfs::Source::Bytes(s.data.clone()), s.mode),
            ));
        }
        Ok((extra, ssh_key))
    }
}

/// Realises the kernel's merged config and records its store path and hash; fails when
/// olddefconfig dropped an option a fragment set, naming the fragment.
fn realise_kernel_config(eval: &Eval, fragments: &[String], record: &mut NixRecord) -> Result<()> {
    ui::step("realise kernel config");
    let cfg_dir = eval
        .build(&["kernelConfig".into()], "kernel config")?
        .remove(0);
    record.kernel_config_path = Some(cfg_dir.display().to_string());
    record.kernel_config_sha256 = Some(crate::digest::sha256_file(&cfg_dir.join("config"))?);
    let report = nix::read_config_report(&cfg_dir, fragments)?;
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
    Ok(())
}

/// The package attributes a build realises: the profile's, then busybox (every backend's
/// scripts run on it: the profile's, static or not, else the set's default) and the backend's
/// own package (runit, s6) when the profile lacks them.
pub fn packages_for(profile: &Profile, backend: rootfs::Backend) -> Vec<String> {
    let mut packages = profile.packages.clone();
    let has_busybox = packages.iter().any(|p| is_busybox(p));
    let busybox = (!has_busybox).then_some("busybox");
    for needed in busybox.into_iter().chain(backend.package()) {
        if !packages.iter().any(|p| p == needed) {
            packages.push(needed.to_string());
        }
    }
    packages
}

/// A busybox package: `busybox` or one from another set of the same source (`pkgsStatic.busybox`).
pub fn is_busybox(attr: &str) -> bool {
    attr == "busybox" || attr.ends_with(".busybox")
}

/// The program folders of a package, as in Nixpkgs: `bin/`, then `sbin/` (busybox's `ip`,
/// `init`, `poweroff`; dropbear's server).
pub const PROGRAM_DIRS: [&str; 2] = ["bin", "sbin"];

/// The `/bin` links of the image: (name, store path) for every program in a package's `bin/`
/// and `sbin/`, the busybox at `busybox_index` first (the first of a name wins: the busybox
/// of the init and /bin/sh is the last one the profile names, a child's choice over its
/// parents').
pub fn program_links(package_paths: &[PathBuf], busybox_index: usize) -> Vec<(String, String)> {
    let mut links = Vec::new();
    let order = std::iter::once(busybox_index)
        .chain((0..package_paths.len()).filter(|&i| i != busybox_index));
    for pkg in order.filter_map(|i| package_paths.get(i)) {
        let pkg_s = pkg.display().to_string();
        for dir in PROGRAM_DIRS {
            if let Ok(entries) = fs::read_dir(pkg.join(dir)) {
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect();
                names.sort();
                for n in names {
                    if !n.starts_with('.') {
                        links.push((n.clone(), format!("{pkg_s}/{dir}/{n}")));
                    }
                }
            }
        }
    }
    links
}

/// Where the selection starts in a package: its programs (`bin/` and `sbin/`), else the whole
/// output (a library such as skalibs' `lib`).
pub fn package_roots(pkg: &Path) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = PROGRAM_DIRS
        .iter()
        .map(|d| pkg.join(d))
        .filter(|d| d.is_dir())
        .collect();
    if dirs.is_empty() {
        vec![pkg.to_path_buf()]
    } else {
        dirs
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
    /// Entries that files of other store paths also refer to: path -> [(referrer, how)].
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub also: std::collections::BTreeMap<String, Vec<(Option<String>, String)>>,
    /// The closure's store references (store path -> the store paths it refers to) and the
    /// packages' store paths, for chains to store paths nothing was kept from.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub references: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<(String, String)>,
    /// The packages' programs the image links in `/bin`: store path -> `/bin/<name>`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub programs: std::collections::BTreeMap<String, String>,
}

/// Compose bonsai's files, then walk from the roots (the packages' programs, the init, the
/// services, `keep` globs) through ELF dependencies, symlinks and store references; prune,
/// strip and verify.
fn assemble(
    plan: &Plan,
    package_paths: &[PathBuf],
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
    pid1: Option<PathBuf>,
    extra: &[ExtraFile],
) -> Result<(Tree, Assembly)> {
    let mut tree = Tree::new();
    let system = compose_tree(plan, &mut tree, package_paths, closure, pid1)?;
    for (path, node) in extra {
        tree.insert(path, node.clone())?;
    }
    let assembly = select_files(plan, &mut tree, package_paths, closure, &system)?;
    Ok((tree, assembly))
}

/// Composes bonsai's own files into `tree` (`/bin` links, `/etc`, the init backend, the
/// checks) from the profile's service description, validated against the programs the image
/// will have; returns that description.
fn compose_tree(
    plan: &Plan,
    tree: &mut Tree,
    package_paths: &[PathBuf],
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
    pid1: Option<PathBuf>,
) -> Result<rootfs::system::System> {
    let (board, profile) = (&plan.board, &plan.profile);
    let busybox_index = plan
        .packages
        .iter()
        .rposition(|p| is_busybox(p))
        .context("the busybox package is missing")?;
    let bin_links = program_links(package_paths, busybox_index);
    let init = init_inputs(plan, package_paths, busybox_index, pid1)?;
    let system = validate_system(plan, &bin_links, closure)?;
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
    rootfs::compose(tree, &spec)?;
    Ok(spec.system)
}

/// What the init backend renders against: the busybox at `busybox_index`, the runit and s6
/// packages when the plan has them, bonsai-init when it was built, and the judge's test faults.
fn init_inputs(
    plan: &Plan,
    package_paths: &[PathBuf],
    busybox_index: usize,
    pid1: Option<PathBuf>,
) -> Result<rootfs::InitInputs> {
    let find = |attr: &str| {
        plan.packages
            .iter()
            .position(|p| p == attr)
            .map(|i| package_paths[i].display().to_string())
    };
    Ok(rootfs::InitInputs {
        backend: plan.backend,
        busybox: package_paths[busybox_index].display().to_string(),
        runit: find("runit"),
        s6: find("s6"),
        bonsai_init: pid1,
        faults: crate::conformance::test_faults()?,
    })
}

/// The profile's service description, validated against the programs the image will have: a
/// `/bin` or `/sbin` link (bonsai-init as the init), a file of the closure, or bonsai's own
/// `/etc/bonsai/` scripts.
fn validate_system(
    plan: &Plan,
    bin_links: &[(String, String)],
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
) -> Result<rootfs::system::System> {
    let bin_names: std::collections::BTreeSet<&str> =
        bin_links.iter().map(|(n, _)| n.as_str()).collect();
    let program_exists = |p: &str| -> bool {
        if let Some(name) = p.strip_prefix("/bin/").or_else(|| p.strip_prefix("/sbin/")) {
            bin_names.contains(name)
                || (name == "bonsai-init" && plan.backend == rootfs::Backend::BonsaiInit)
        } else if p.starts_with("/nix/store/") {
            closure.keys().any(|c| p.starts_with(c.as_str())) && Path::new(p).exists()
        } else if p.starts_with('/') {
            p.starts_with("/etc/bonsai/")
        } else {
            bin_names.contains(p)
        }
    };
    rootfs::system::validate(
        &plan.profile.system,
        &plan.board.name.replace('_', "-"),
        &program_exists,
    )
    .map_err(|e| anyhow::anyhow!("profiles/{}.toml: {e}", plan.profile.name))
}

/// Selects the image's files from the closure, walking from the packages' programs and the
/// composed tree's roots; populates `tree` with them (pruned, stripped), verifies it and runs
/// the image's hygiene checks; returns the selection's record.
fn select_files(
    plan: &Plan,
    tree: &mut Tree,
    package_paths: &[PathBuf],
    closure: &std::collections::BTreeMap<String, nix::PathInfo>,
    system: &rootfs::system::System,
) -> Result<Assembly> {
    let profile = &plan.profile;
    ui::step(format!("select files from {} store paths", closure.len()));
    let mut roots = Vec::new();
    for (attr, pkg) in plan.packages.iter().zip(package_paths) {
        for root in package_roots(pkg) {
            roots.push(rootfs::Root::new(
                root.display().to_string(),
                format!("package {attr}"),
            ));
        }
    }
    roots.extend(rootfs::roots_from_tree(tree)?);
    let closure_paths: Vec<String> = closure.keys().cloned().collect();
    let policy = &profile.policy;
    let problems = |e| selection_problems(&profile.name, e);
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
    let report = rootfs::populate(tree, &selection, policy)?;
    for w in &report.warnings {
        ui::warn(w.to_string());
    }
    rootfs::verify(tree, policy).map_err(problems)?;
    crate::hygiene::check(tree, profile, system, &plan.secrets)?;
    let mut assembly = assembly_of(&selection, &report)?;
    assembly.references = closure
        .iter()
        .map(|(p, info)| {
            let refs = info.references.iter().filter(|r| *r != p).cloned();
            (p.clone(), refs.collect())
        })
        .collect();
    assembly.packages = plan
        .packages
        .iter()
        .zip(package_paths)
        .map(|(attr, p)| (attr.clone(), p.display().to_string()))
        .collect();
    // The /bin links compose made (the first program of a name wins, busybox's first).
    if let Some(bb) = plan.packages.iter().rposition(|p| is_busybox(p)) {
        let mut names = std::collections::BTreeSet::new();
        for (name, target) in program_links(package_paths, bb) {
            if names.insert(name.clone()) {
                assembly.programs.insert(target, format!("/bin/{name}"));
            }
        }
    }
    // Nothing is written when the image holds what the profile forbids.
    for w in crate::forbid::check(&profile.name, &policy.forbid, &assembly)? {
        ui::warn(w);
    }
    Ok(assembly)
}

/// A selection or verification error: every problem on a line of its own, under a line that
/// counts them and names the profile.
fn selection_problems(profile: &str, e: rootfs::Error) -> anyhow::Error {
    match e {
        rootfs::Error::Problems { step, problems } => {
            let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            let plural = if problems.len() == 1 { "" } else { "s" };
            anyhow::anyhow!(
                "{step} found {} problem{plural} in profile {profile}:\n{}",
                problems.len(),
                lines.join("\n")
            )
        }
        other => other.into(),
    }
}

/// The record of what went into the image and why (selection.json), noting how many store
/// paths of the closure vanished.
fn assembly_of(selection: &rootfs::Selection, report: &rootfs::PopulateReport) -> Result<Assembly> {
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
    let also = selection
        .also
        .iter()
        .map(|(p, rs)| {
            let rs = rs
                .iter()
                .map(|r| (r.from.clone(), r.how.to_string()))
                .collect();
            (p.clone(), rs)
        })
        .collect();
    Ok(Assembly {
        sizes: serde_json::to_value(&report.sizes)?,
        vanished,
        rewritten: report.rewritten.clone(),
        pruned: serde_json::to_value(&selection.pruned)?,
        reasons,
        also,
        references: std::collections::BTreeMap::new(),
        packages: Vec::new(),
        programs: std::collections::BTreeMap::new(),
    })
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

/// What a build made, ready to be written out: Nix's kernel image (and device tree), the
/// image tree, the closure it was selected from and the record of that selection.
struct Image {
    kernel: PathBuf,
    dtb: Option<PathBuf>,
    tree: Tree,
    closure: std::collections::BTreeMap<String, nix::PathInfo>,
    assembly: Assembly,
    /// The private key that logs in as root, when bonsai made it.
    ssh_key: Option<PathBuf>,
    /// bonsai-init's store path, when the image has it (the init, or bonsai-update).
    bonsai_init: Option<String>,
}

/// The folder an output is written into before it is swapped in, and which of its files is
/// being written (a disk-full error names it).
struct Stage<'a> {
    dir: &'a Path,
    writing: String,
}

impl Stage<'_> {
    /// The path of `file` in the folder, noted as the file being written.
    fn start(&mut self, file: &str) -> PathBuf {
        self.writing = file.to_string();
        self.dir.join(file)
    }
}

/// What the files written into a stage measure, for build.json.
struct Written {
    kernel_bytes: u64,
    /// The device tree's file name, when the board names one.
    dtb: Option<String>,
    pack: rootfs::PackReport,
    /// The image's file count (the manifest's).
    files: u64,
    /// SHA-256 of each output file.
    outputs: std::collections::BTreeMap<String, String>,
}

/// Writes `out/<board>/`: every file goes into a fresh folder beside it, which then replaces
/// the previous output atomically, so an interrupted or failed build leaves that one as it was.
fn write_output(
    plan: &Plan,
    image: &Image,
    fingerprint: String,
    record: NixRecord,
) -> Result<BuildInfo> {
    let stage = stage_folder(&plan.out)?;
    // Removed on SIGINT/SIGTERM/SIGHUP too, which run no destructors.
    let staged = crate::outdir::track_stage(stage.path());
    let mut files = Stage {
        dir: stage.path(),
        writing: "kernel".into(),
    };
    let info = write_staged(plan, image, &mut files, fingerprint, record).map_err(|e| {
        if crate::outdir::is_disk_full(&e) {
            disk_full(&plan.out, &files.writing, &image.kernel, &image.tree)
        } else {
            e
        }
    })?;

    // Swap the new folder in, atomically; the previous one is removed afterwards.
    let _ = stage.keep();
    crate::outdir::swap_in(staged, &plan.out)?;
    Ok(info)
}

/// A fresh folder beside `out` (creating `out`'s parent), where the output is written before
/// it is swapped in.
fn stage_folder(out: &Path) -> Result<tempfile::TempDir> {
    let parent = out.parent().context("output folder has no parent")?;
    fs::create_dir_all(parent)
        .with_context(|| format!("cannot create output folder {}", parent.display()))?;
    let name = out
        .file_name()
        .context("output folder has no name")?
        .to_string_lossy()
        .to_string();
    tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)
        .with_context(|| format!("cannot write to output folder {}", parent.display()))
}

/// Writes every output file into the stage, build.json last: the kernel and device tree,
/// the packed initramfs (within the board's budgets), manifest.json and selection.json.
fn write_staged(
    plan: &Plan,
    image: &Image,
    stage: &mut Stage<'_>,
    fingerprint: String,
    record: NixRecord,
) -> Result<BuildInfo> {
    let kernel_bytes = write_kernel(&plan.board, &image.kernel, stage)?;
    let dtb = match &image.dtb {
        Some(d) => Some(write_dtb(d, stage)?),
        None => None,
    };
    let initramfs = plan.board.compression.file_name();
    let pack = pack_initramfs(plan, &image.tree, stage)?;
    check_initramfs_budget(&plan.board, &image.assembly, pack.compressed_bytes)?;
    let files = write_manifest_and_selection(plan, image, stage)?;
    let outputs = ["kernel", initramfs, "manifest.json"]
        .iter()
        .copied()
        .chain(dtb.as_deref())
        .map(|f| {
            Ok((
                f.to_string(),
                crate::digest::sha256_file(&stage.dir.join(f))?,
            ))
        })
        .collect::<Result<_>>()?;
    let written = Written {
        kernel_bytes,
        dtb,
        pack,
        files,
        outputs,
    };
    let info = build_info(plan, image, written, fingerprint, record);
    fs::write(
        stage.start("build.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    Ok(info)
}

/// Copies the kernel image into the stage as `kernel` (mode 0644, whatever the store's), after
/// checking it against the board's `budget.kernel`; returns its size.
fn write_kernel(board: &Board, kernel_image: &Path, stage: &mut Stage<'_>) -> Result<u64> {
    let kernel_bytes = fs::metadata(kernel_image)?.len();
    if let Some(max) = board.budget.kernel {
        if kernel_bytes > max {
            bail!("boards/{}.toml: budget.kernel: kernel is {} ({kernel_bytes} B), over the budget of {} ({max} B)", board.name, ui::size(kernel_bytes), ui::size(max));
        }
    }
    let kernel = stage.start("kernel");
    fs::copy(kernel_image, &kernel).context("copying the kernel")?;
    let mut perms = fs::metadata(&kernel)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    fs::set_permissions(&kernel, perms)?;
    Ok(kernel_bytes)
}

/// Copies the device tree into the stage under its own file name, which it returns.
fn write_dtb(dtb: &Path, stage: &mut Stage<'_>) -> Result<String> {
    let name = dtb
        .file_name()
        .context("device tree path has no file name")?
        .to_string_lossy()
        .to_string();
    fs::write(stage.start(&name), fs::read(dtb)?).context("copying the device tree")?;
    Ok(name)
}

/// Packs the tree into the stage's initramfs with the board's compression, through the pack
/// cache unless the image holds secrets (their bytes must not land in a shared cache; such an
/// initramfs is readable by its owner only).
fn pack_initramfs(plan: &Plan, tree: &Tree, stage: &mut Stage<'_>) -> Result<rootfs::PackReport> {
    let compression = plan.board.compression;
    ui::step(format!(
        "pack initramfs ({}, {} entries)",
        compression.name(),
        tree.len()
    ));
    let mtime = u32::try_from(plan.epoch).context("SOURCE_DATE_EPOCH does not fit a cpio mtime")?;
    let path = stage.start(compression.file_name());
    let cache = if plan.secrets.is_empty() {
        pack_cache(compression)?
    } else {
        ui::detail("pack cache: not used (the image holds secrets)");
        None
    };
    let options = PackOptions {
        compression,
        level: None,
        mtime,
    };
    let report = rootfs::pack_cached(tree, &options, &path, cache.clone())?;
    if let Some(cache) = &cache {
        report_pack_cache(cache);
        prune_pack_cache(cache);
    }
    if !plan.secrets.is_empty() {
        // Readable by the owner only, like the secrets' own sources should be.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    }
    crate::outdir::test_delay("BONSAI_TEST_PACK_DELAY_MS");
    Ok(report)
}

/// Fails when the packed initramfs is over the board's `budget.initramfs`, naming the three
/// largest store paths in the image.
fn check_initramfs_budget(board: &Board, assembly: &Assembly, bytes: u64) -> Result<()> {
    let Some(max) = board.budget.initramfs else {
        return Ok(());
    };
    if bytes <= max {
        return Ok(());
    }
    let offenders: Vec<String> = largest_store_paths(assembly, 3)
        .iter()
        .map(|(b, p)| format!("{p} {}", ui::size(*b)))
        .collect();
    bail!(
        "boards/{}.toml: budget.initramfs: initramfs is {}, over the budget of {}; largest: {}",
        board.name,
        ui::size(bytes),
        ui::size(max),
        offenders.join(", ")
    );
}

/// The `n` store paths that take the most image bytes (size report), largest first.
fn largest_store_paths(assembly: &Assembly, n: usize) -> Vec<(u64, String)> {
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
    top.truncate(n);
    top
}

/// Writes manifest.json (with the development and secrets flags) and selection.json into
/// the stage; returns the image's file count.
fn write_manifest_and_selection(plan: &Plan, image: &Image, stage: &mut Stage<'_>) -> Result<u64> {
    let mut manifest = rootfs::manifest(&image.tree)?;
    manifest.development = plan.profile.development;
    manifest.secrets = crate::hygiene::secret_paths(&plan.secrets);
    manifest.holds_secrets = !manifest.secrets.is_empty();
    fs::write(stage.start("manifest.json"), manifest.to_json())?;
    fs::write(
        stage.start("selection.json"),
        serde_json::to_string_pretty(&image.assembly)? + "\n",
    )?;
    Ok(manifest.totals.files)
}

/// The build.json of an output: what was built from what, the files written and their sizes,
/// what `boot --check` judges, and the fingerprint that makes the next build a no-op.
fn build_info(
    plan: &Plan,
    image: &Image,
    written: Written,
    fingerprint: String,
    record: NixRecord,
) -> BuildInfo {
    let (board, profile) = (&plan.board, &plan.profile);
    BuildInfo {
        board: board.name.clone(),
        profile: profile.name.clone(),
        init: plan.init.clone(),
        source: plan.source.describe(),
        kernel: "kernel".into(),
        initramfs: board.compression.file_name().into(),
        dtb: written.dtb,
        kernel_bytes: written.kernel_bytes,
        initramfs_bytes: written.pack.compressed_bytes,
        initramfs_uncompressed_bytes: written.pack.cpio.archive_bytes,
        files: written.files,
        store_paths: image
            .closure
            .keys()
            .filter(|k| !image.assembly.vanished.contains(k))
            .cloned()
            .collect(),
        source_date_epoch: plan.epoch,
        checks: all_checks(board, profile),
        shutdown_expect: profile.shutdown_expect.clone(),
        console_expect: profile.console_expect.clone(),
        test_machine: profile.test_machine.clone(),
        fingerprint,
        ssh_key: image.ssh_key.clone(),
        outputs: written.outputs,
        development: profile.development,
        secrets: crate::hygiene::secret_paths(&plan.secrets),
        update_key: plan.update_key.clone(),
        nix: record,
        forbid: profile.policy.forbid.clone(),
        overrides: profile.overrides.clone(),
    }
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
/// init, the C toolchain, SOURCE_DATE_EPOCH, the package source (by name: a Nixpkgs checkout or
/// flake may change under it, which only Nix can tell) and the xtask binary itself.
#[allow(clippy::too_many_arguments)]
pub fn fingerprint(
    root: &Path,
    board: &Board,
    profile: &Profile,
    init: &str,
    source: &PackageSource,
    epoch: u64,
    secrets: &[crate::hygiene::Secret],
    update_key: Option<&str>,
) -> Result<Option<String>> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("source={}\n", source.describe()).as_bytes());
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
    // A local package's or an overlay's folder: its expression and the files beside it (its
    // sources, files it imports).
    for f in profile.local_packages.values().chain(&profile.overlays) {
        let file = root.join(&f.path);
        match file.parent() {
            Some(dir) if dir != root => collect_files(dir, &mut nix_files)?,
            _ => nix_files.push(file),
        }
    }
    nix_files.sort();
    nix_files.dedup();
    for f in &nix_files {
        add_file(&mut h, f)?;
    }
    h.update(format!("init={init}\nepoch={epoch}\n").as_bytes());
    // bonsai-init is in the image as the init, or as bonsai-update with the update key.
    if init == rootfs::Backend::BonsaiInit.name() || update_key.is_some() {
        add_bonsai_init_inputs(&mut h, &crate::source_root(root), board, &add_file)?;
    }
    if let Some(k) = update_key {
        h.update(format!("update-key={k}\n").as_bytes());
    }
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
    if let Some((cc, _)) = crate::host::host_arch()
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
    Ok(Some(crate::digest::hex(&h.finalize())))
}

/// What the bonsai-init binary is built from: the `pid1/` crate, the workspace manifest
/// (its `release-pid1` profile), Cargo.lock, the board's Rust target and the compiler.
fn add_bonsai_init_inputs(
    h: &mut sha2::Sha256,
    root: &Path,
    board: &Board,
    add_file: &dyn Fn(&mut sha2::Sha256, &Path) -> Result<()>,
) -> Result<()> {
    use sha2::Digest;
    let mut files = Vec::new();
    collect_files(&root.join("pid1/src"), &mut files)?;
    files.sort();
    for f in files.iter().chain(&[
        root.join("pid1/Cargo.toml"),
        root.join("Cargo.toml"),
        root.join("Cargo.lock"),
    ]) {
        add_file(h, f)?;
    }
    h.update(format!("rust-target={}\n", board.rust_target).as_bytes());
    h.update(crate::pid1::rustc_version().as_bytes());
    Ok(())
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
            crate::digest::sha256_file(&out.join(f))
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
        _ => crate::cache::cache_dir().join("pack"),
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
    let hex = crate::digest::hex(&hash);
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

    /// A fake store path with the given programs (empty files) under bin/ and sbin/.
    fn package(dir: &Path, name: &str, programs: &[&str]) -> PathBuf {
        let pkg = dir.join(name);
        for p in programs {
            let f = pkg.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, b"").unwrap();
        }
        pkg
    }

    /// Nixpkgs' busybox keeps `ip` and `init` in sbin/, dropbear its server: they get /bin
    /// links and are selection roots like bin/.
    #[test]
    fn sbin_programs_are_linked_and_are_roots() {
        let d = tempfile::tempdir().unwrap();
        let bb = package(
            d.path(),
            "bb",
            &["bin/busybox", "bin/sh", "sbin/ip", "sbin/init"],
        );
        let db = package(
            d.path(),
            "db",
            &["bin/dbclient", "sbin/dropbear", "bin/.hidden"],
        );
        let lib = package(d.path(), "lib", &["lib/libx.so.1"]);
        let links = program_links(&[bb.clone(), db.clone(), lib.clone()], 0);
        let s = |p: &Path, rest: &str| format!("{}/{rest}", p.display());
        assert_eq!(
            links,
            [
                ("busybox".to_string(), s(&bb, "bin/busybox")),
                ("sh".to_string(), s(&bb, "bin/sh")),
                ("init".to_string(), s(&bb, "sbin/init")),
                ("ip".to_string(), s(&bb, "sbin/ip")),
                ("dbclient".to_string(), s(&db, "bin/dbclient")),
                ("dropbear".to_string(), s(&db, "sbin/dropbear")),
            ]
        );
        assert_eq!(package_roots(&db), [db.join("bin"), db.join("sbin")]);
        assert_eq!(package_roots(&lib), std::slice::from_ref(&lib));
    }

    /// The busybox the profile names last comes first, so its links win.
    #[test]
    fn the_chosen_busybox_links_first() {
        let d = tempfile::tempdir().unwrap();
        let dynamic = package(d.path(), "dyn", &["bin/sh", "bin/blkid"]);
        let stat = package(d.path(), "static", &["bin/sh"]);
        let links = program_links(&[dynamic.clone(), stat.clone()], 1);
        let sh: Vec<&String> = links
            .iter()
            .filter(|(n, _)| n == "sh")
            .map(|(_, t)| t)
            .collect();
        assert_eq!(sh[0], &format!("{}/bin/sh", stat.display()));
        assert!(links.iter().any(|(n, _)| n == "blkid"));
        assert!(is_busybox("busybox") && is_busybox("pkgsStatic.busybox"));
        assert!(!is_busybox("busybox-extra") && !is_busybox("hello"));
    }

    /// A changed bonsai-init source, Cargo.lock or workspace manifest is a changed input of a
    /// bonsai-init build (and only of one).
    /// A scratch copy of the repository's data folders (and `extra` ones).
    fn scratch_repo(extra: &[&str]) -> tempfile::TempDir {
        let repo = project_root();
        let d = tempfile::tempdir().unwrap();
        let data = ["boards", "profiles", "kernel-configs", "nix", "examples"];
        for dir in data.iter().chain(extra) {
            let mut files = Vec::new();
            collect_files(&repo.join(dir), &mut files).unwrap();
            for f in files {
                let to = d.path().join(f.strip_prefix(&repo).unwrap());
                fs::create_dir_all(to.parent().unwrap()).unwrap();
                fs::copy(&f, to).unwrap();
            }
        }
        d
    }

    fn append(path: &Path, text: &str) {
        let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    }

    /// A profile's overlay, and the files beside it, are inputs of the build.
    #[test]
    fn fingerprint_covers_overlays_and_the_files_beside_them() {
        let d = scratch_repo(&[]);
        let root = d.path();
        fs::create_dir_all(root.join("overlays")).unwrap();
        fs::write(
            root.join("overlays/team.nix"),
            "final: prev: import ./extra.nix final prev\n",
        )
        .unwrap();
        fs::write(root.join("overlays/extra.nix"), "final: prev: { }\n").unwrap();
        fs::write(
            root.join("profiles/ov.toml"),
            "description = \"o\"\ninherit = [\"minimal\"]\noverlays = [\"overlays/team.nix\"]\n",
        )
        .unwrap();
        let cfg = Config::new(root);
        let board = cfg.load_board("qemu-x86_64").unwrap();
        let profile = cfg.load_profile("ov").unwrap();
        let fp = || {
            fingerprint(
                root,
                &board,
                &profile,
                "busybox",
                &PackageSource::Offline,
                0,
                &[],
                None,
            )
            .unwrap()
            .unwrap()
        };
        let first = fp();
        assert_eq!(fp(), first);
        append(&root.join("overlays/team.nix"), "# changed\n");
        let second = fp();
        assert_ne!(second, first, "a changed overlay left the fingerprint");
        append(&root.join("overlays/extra.nix"), "# changed\n");
        assert_ne!(
            fp(),
            second,
            "a changed file beside the overlay left the fingerprint"
        );
    }

    #[test]
    fn fingerprint_covers_the_bonsai_init_sources() {
        let d = scratch_repo(&["pid1/src"]);
        let root = d.path();
        let repo = project_root();
        for f in ["Cargo.toml", "Cargo.lock", "pid1/Cargo.toml"] {
            fs::copy(repo.join(f), root.join(f)).unwrap();
        }
        let cfg = Config::new(root);
        let board = cfg.load_board("qemu-x86_64").unwrap();
        let profile = cfg.load_profile(&board.profile).unwrap();
        let fp = |init: &str| {
            fingerprint(
                root,
                &board,
                &profile,
                init,
                &PackageSource::Offline,
                0,
                &[],
                None,
            )
            .unwrap()
            .unwrap()
        };
        let (bonsai, busybox) = (fp("bonsai-init"), fp("busybox"));
        let append = |rel: &str, text: &str| append(&root.join(rel), text);
        append("pid1/src/main.rs", "// a changed source\n");
        let changed = fp("bonsai-init");
        assert_ne!(changed, bonsai, "a pid1/src change left the fingerprint");
        assert_eq!(
            fp("busybox"),
            busybox,
            "busybox images do not hold bonsai-init"
        );
        append("Cargo.lock", "\n");
        let locked = fp("bonsai-init");
        assert_ne!(locked, changed, "a Cargo.lock change left the fingerprint");
        append("Cargo.toml", "\n");
        assert_ne!(
            fp("bonsai-init"),
            locked,
            "a Cargo.toml change left the fingerprint"
        );
    }

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
        assert!(text.ends_with(&format!("{}\n", crate::digest::hex(&one))));
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
