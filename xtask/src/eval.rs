//! `cargo xtask eval --board <b>`: what a build would realise, without building anything. Nix's
//! dry run for a board: each package, the kernel config and the kernel are instantiated from
//! `nix/bonsai.nix` with `allow-import-from-derivation = false` (as Hydra, `nix flake check`
//! and restricted evaluation run), and each output is reported as already valid in the store,
//! substitutable from a binary cache, or to be built. `--json` prints the report documented
//! by `schemas/eval.schema.json`.

use std::collections::BTreeSet;
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::config::{Config, KernelSource, INITS};
use crate::nix::{self, PackageSource};
use crate::{project_root, ui};

#[derive(Args, Debug, Clone, Default)]
pub struct Eval {
    /// Board to evaluate (see `cargo xtask list`)
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Profile instead of the board's default
    #[arg(long)]
    pub profile: Option<String>,
    /// Init backend instead of the profile's choice
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Real Nixpkgs (a path or a flake reference) instead of the offline package set; also
    /// settable with BONSAI_NIXPKGS
    #[arg(long)]
    pub nixpkgs: Option<String>,
    /// Print the report as JSON (schemas/eval.schema.json)
    #[arg(long)]
    pub json: bool,
}

/// The version of the report's JSON shape (`schema` in the document).
pub const SCHEMA: &str = "bonsai-eval/1";

/// What `eval --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub board: String,
    pub profile: String,
    pub init: String,
    pub source: String,
    pub nix_version: String,
    /// Always false: the evaluation ran with allow-import-from-derivation = false.
    pub allow_import_from_derivation: bool,
    pub items: Vec<Item>,
    pub summary: Summary,
    /// `[overrides.<attribute>]` in force (inherited, the child winning per argument):
    /// attribute -> argument -> {value, profile}.
    pub overrides: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::OverrideArg>,
    >,
    /// `[image] forbid` in force: the store path name globs a build checks.
    pub forbid: Vec<String>,
}

/// One derivation a build would realise.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// `package`, `kernel-config` or `kernel`
    pub role: &'static str,
    /// The attribute path in the package set (`busybox`, `pkgsStatic.busybox`), or bonsai's
    /// own name for the kernel config and a kernel built from fragments.
    pub attribute: String,
    /// The attribute of nix/bonsai.nix that holds it (`packages.p0`, `kernelConfig`, `kernel`).
    pub bonsai_attribute: String,
    pub drv_path: String,
    /// The output nix-build prints and bonsai reads (the first of the derivation's outputs).
    pub output: String,
    /// Every output in the derivation's order.
    pub outputs: Vec<Output>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub name: String,
    pub path: String,
    pub valid: bool,
    pub substitutable: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub derivations: usize,
    pub outputs: usize,
    pub valid: usize,
    pub substitutable: usize,
    /// Outputs neither valid nor substitutable: a build would run their derivations.
    pub to_build: usize,
}

impl Eval {
    pub fn run(self) -> Result<()> {
        let report = self.report()?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_table(&report);
        }
        Ok(())
    }

    /// Evaluates the board and asks the store about each output; builds nothing.
    pub fn report(&self) -> Result<Report> {
        let root = project_root();
        let cfg = Config::new(&root);
        let board = cfg.load_board(&self.board)?;
        let profile_name = self
            .profile
            .clone()
            .unwrap_or_else(|| board.profile.clone());
        let profile = cfg.load_profile(&profile_name)?;
        let init = self.init.clone().unwrap_or_else(|| profile.init.clone());
        let backend =
            rootfs::Backend::parse(&init).with_context(|| format!("unknown init '{init}'"))?;
        let packages = crate::build::packages_for(&profile, backend);
        let source = PackageSource::from_request(self.nixpkgs.as_deref())?;
        ui::step(format!(
            "evaluate {} (profile {}, init {init}, packages from {}) with allow-import-from-derivation = false",
            board.name,
            profile.name,
            source.describe()
        ));
        // The offline set's Debian inputs are downloaded here (a download, not a build).
        let eval = nix::Eval::for_profile(&root, &board, &packages, &profile, &source)?;

        let mut wanted: Vec<(&'static str, String, String)> = packages
            .iter()
            .enumerate()
            .map(|(i, p)| ("package", p.clone(), format!("packages.p{i}")))
            .collect();
        match &board.kernel.source {
            KernelSource::Build { base, fragments } => {
                let what = format!("{base} + {}", fragments.join(" + "));
                wanted.push((
                    "kernel-config",
                    format!("kernel config ({what})"),
                    "kernelConfig".into(),
                ));
                wanted.push((
                    "kernel",
                    "linuxManualConfig (the merged config)".into(),
                    "kernel".into(),
                ));
            }
            KernelSource::Package(p) => wanted.push(("kernel", p.clone(), "kernel".into())),
        }
        let attrs: Vec<String> = wanted.iter().map(|w| w.2.clone()).collect();
        let instantiated = eval.instantiate_without_ifd(&attrs, "evaluating")?;

        let drvs: Vec<String> = instantiated.iter().map(|(d, _)| d.clone()).collect();
        let shown = show_derivations(&drvs)?;
        let mut items = Vec::new();
        for ((role, attribute, bonsai_attribute), (drv, output)) in
            wanted.into_iter().zip(instantiated)
        {
            let d = shown
                .get(&drv)
                .with_context(|| format!("nix show-derivation printed nothing for {drv}"))?;
            let order: Vec<String> = d["env"]["outputs"]
                .as_str()
                .unwrap_or("out")
                .split_whitespace()
                .map(String::from)
                .collect();
            let mut outputs = Vec::new();
            for name in &order {
                let path = d["outputs"][name]["path"]
                    .as_str()
                    .with_context(|| format!("{drv} has no path for its output {name}"))?;
                outputs.push(Output {
                    name: name.clone(),
                    path: path.to_string(),
                    valid: false,
                    substitutable: false,
                });
            }
            let output = output.unwrap_or_else(|| order.first().cloned().unwrap_or_default());
            items.push(Item {
                role,
                attribute,
                bonsai_attribute,
                drv_path: drv,
                output,
                outputs,
            });
        }

        let paths: Vec<String> = items
            .iter()
            .flat_map(|i| i.outputs.iter().map(|o| o.path.clone()))
            .collect();
        let invalid = invalid_paths(&paths)?;
        let missing: Vec<String> = items
            .iter()
            .filter(|i| i.outputs.iter().any(|o| invalid.contains(&o.path)))
            .map(|i| i.drv_path.clone())
            .collect();
        let fetchable = if missing.is_empty() {
            BTreeSet::new()
        } else {
            dry_run(&missing)?
        };
        let mut summary = Summary {
            derivations: items.len(),
            ..Summary::default()
        };
        for o in items.iter_mut().flat_map(|i| i.outputs.iter_mut()) {
            o.valid = !invalid.contains(&o.path);
            o.substitutable = !o.valid && fetchable.contains(&o.path);
            summary.outputs += 1;
            if o.valid {
                summary.valid += 1;
            } else if o.substitutable {
                summary.substitutable += 1;
            } else {
                summary.to_build += 1;
            }
        }
        Ok(Report {
            schema: SCHEMA,
            board: board.name.clone(),
            profile: profile.name.clone(),
            init,
            source: source.describe(),
            nix_version: nix_version(),
            allow_import_from_derivation: false,
            items,
            summary,
            overrides: profile.overrides.clone(),
            forbid: profile.policy.forbid.clone(),
        })
    }
}

fn print_table(r: &Report) {
    println!(
        "{} (profile {}, init {}, packages from {}, Nix {}):",
        r.board, r.profile, r.init, r.source, r.nix_version
    );
    let width = r
        .items
        .iter()
        .flat_map(|i| i.outputs.iter().map(|o| o.name.len()))
        .max()
        .unwrap_or(3)
        .max(3);
    for i in &r.items {
        println!("{} [{}]  {}", i.attribute, i.bonsai_attribute, i.drv_path);
        for o in &i.outputs {
            let state = if o.valid {
                "valid"
            } else if o.substitutable {
                "substitutable"
            } else {
                "to build"
            };
            let mark = if o.name == i.output { "*" } else { " " };
            println!("  {mark}{:width$}  {state:13}  {}", o.name, o.path);
        }
    }
    let s = &r.summary;
    println!(
        "{} derivations, {} outputs: {} valid, {} substitutable, {} to build (* = the output bonsai reads; evaluated with allow-import-from-derivation = false, nothing built)",
        s.derivations, s.outputs, s.valid, s.substitutable, s.to_build
    );
}

/// `nix show-derivation` (Nix 2.8 and later; `nix derivation show` where it is gone), keyed
/// by full .drv path.
fn show_derivations(drvs: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    let attempt = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = crate::nixbin::current()?.command("nix");
        cmd.args(args).args(drvs);
        cmd.output().context("running nix show-derivation")
    };
    let mut out = attempt(&["show-derivation"])?;
    if !out.status.success() {
        out = attempt(&["derivation", "show"])?;
    }
    if !out.status.success() {
        bail!(
            "nix show-derivation failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("")
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing nix show-derivation's JSON")?;
    let map = v
        .as_object()
        .context("nix show-derivation printed no object")?;
    // Newer Nix keys the object by the .drv file's base name.
    Ok(map
        .iter()
        .map(|(k, v)| {
            let key = if k.starts_with('/') {
                k.clone()
            } else {
                format!("/nix/store/{k}")
            };
            (key, v.clone())
        })
        .collect())
}

/// The paths among `paths` that are not valid in the store (`nix-store --check-validity`).
pub fn invalid_paths(paths: &[String]) -> Result<BTreeSet<String>> {
    let mut cmd = crate::nixbin::current()?.command("nix-store");
    cmd.args(["--check-validity", "--print-invalid"])
        .args(paths);
    let out = cmd.output().context("running nix-store --check-validity")?;
    if !out.status.success() {
        bail!(
            "nix-store --check-validity failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// The store paths `nix-store --realise --dry-run` would fetch from a substituter.
fn dry_run(drvs: &[String]) -> Result<BTreeSet<String>> {
    Ok(dry_run_both(drvs)?.1)
}

/// The paths listed under "these N paths will be fetched" (or "this path will be fetched").
pub fn parse_dry_run(log: &str) -> BTreeSet<String> {
    parse_dry_run_both(log).1
}

/// The derivations Nix would build and the paths it would fetch, from the log of a dry run.
pub fn parse_dry_run_both(log: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut built, mut fetched) = (BTreeSet::new(), BTreeSet::new());
    let mut list: Option<bool> = None;
    for line in log.lines() {
        if !line.starts_with(' ') {
            let head = line.starts_with("these ") || line.starts_with("this ");
            list = match () {
                _ if head && line.contains("will be fetched") => Some(false),
                _ if head && line.contains("will be built") => Some(true),
                _ => None,
            };
            continue;
        }
        let p = line.trim();
        match list {
            Some(true) if p.starts_with("/nix/store/") => built.insert(p.to_string()),
            Some(false) if p.starts_with("/nix/store/") => fetched.insert(p.to_string()),
            _ => false,
        };
    }
    (built, fetched)
}

/// [`parse_dry_run_both`] of `nix-store --realise --dry-run` on `drvs`.
pub fn dry_run_both(drvs: &[String]) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut cmd = crate::nixbin::current()?.command("nix-store");
    cmd.args(["--realise", "--dry-run"]).args(drvs);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running nix-store --realise --dry-run")?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "nix-store --realise --dry-run failed: {}",
            nix::failure_summary(&log.lines().map(String::from).collect::<Vec<_>>())
        );
    }
    Ok(parse_dry_run_both(&log))
}

/// The version of the Nix this evaluation used (`BONSAI_NIX`, see `nixbin`).
fn nix_version() -> String {
    crate::nixbin::current()
        .map(|n| n.short_version().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::parse_dry_run;

    #[test]
    fn dry_run_lists_only_what_would_be_fetched() {
        // Nix 2.8's wording, then 2.26's singular form.
        let log = "these 2 derivations will be built:
  /nix/store/vfqyzlnxqawip12hwxz1mll5s6jrb08d-gcc-wrapper.drv
  /nix/store/m71mqbzdfcnl560lygmwyv1i53l0zlpn-hello-2.12.2.drv
these 2 paths will be fetched (0.05 MiB download, 0.20 MiB unpacked):
  /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-zlib-1.3
  /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.40
warning: something
this path will be fetched (0.01 MiB download, 0.02 MiB unpacked):
  /nix/store/cccccccccccccccccccccccccccccccc-hello-2.12.2
";
        let got: Vec<String> = parse_dry_run(log).into_iter().collect();
        assert_eq!(
            got,
            [
                "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-zlib-1.3",
                "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-glibc-2.40",
                "/nix/store/cccccccccccccccccccccccccccccccc-hello-2.12.2",
            ]
        );
        assert!(
            parse_dry_run("these 1 derivations will be built:\n  /nix/store/x.drv\n").is_empty()
        );
        let (built, fetched) = super::parse_dry_run_both(log);
        assert_eq!(
            built.into_iter().collect::<Vec<_>>(),
            [
                "/nix/store/m71mqbzdfcnl560lygmwyv1i53l0zlpn-hello-2.12.2.drv",
                "/nix/store/vfqyzlnxqawip12hwxz1mll5s6jrb08d-gcc-wrapper.drv",
            ]
        );
        assert_eq!(fetched.len(), 3);
        let (built, _) =
            super::parse_dry_run_both("this derivation will be built:\n  /nix/store/y.drv\n");
        assert_eq!(built.into_iter().collect::<Vec<_>>(), ["/nix/store/y.drv"]);
    }
}
