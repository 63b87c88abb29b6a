//! Nix glue: realise a board's packages and kernel through `nix/bonsai.nix`, and read the
//! closure graph (paths, references, NAR sizes and hashes) with `nix path-info`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::{Arch, Board, KernelSource, LocalPackage};
use crate::host;
use crate::offline;
use crate::ui;

/// Where packages come from.
#[derive(Debug, Clone)]
pub enum PackageSource {
    /// nix/offline, built from pinned Debian packages.
    Offline,
    /// A Nixpkgs checkout (path) or flake reference.
    Nixpkgs(String),
}

impl PackageSource {
    pub fn describe(&self) -> String {
        match self {
            PackageSource::Offline => "offline".into(),
            PackageSource::Nixpkgs(r) => format!("nixpkgs {r}"),
        }
    }
}

/// The arguments for one evaluation of nix/bonsai.nix.
pub struct Eval {
    pub args: Vec<String>,
}

impl Eval {
    pub fn new(
        root: &Path,
        board: &Board,
        packages: &[String],
        source: &PackageSource,
    ) -> Result<Eval> {
        Eval::with_local_packages(root, board, packages, &BTreeMap::new(), source)
    }

    /// Like [`Eval::new`], with the profile's `[local-packages]` added to the package set.
    pub fn with_local_packages(
        root: &Path,
        board: &Board,
        packages: &[String],
        local: &BTreeMap<String, LocalPackage>,
        source: &PackageSource,
    ) -> Result<Eval> {
        let kernel = match &board.kernel.source {
            KernelSource::Build { base, fragments } => {
                serde_json::json!({ "base": base, "fragments": fragments })
            }
            KernelSource::Package(p) => serde_json::json!({ "package": p }),
        };
        let local: BTreeMap<&String, serde_json::Value> = local
            .iter()
            .map(|(name, l)| {
                let profile = format!("profiles/{}.toml", l.origin);
                (
                    name,
                    serde_json::json!({ "path": l.path, "profile": profile }),
                )
            })
            .collect();
        let request = serde_json::json!({
            "packages": packages,
            "localPackages": local,
            "kernel": kernel,
        })
        .to_string();
        let mut args = vec![
            root.join("nix/bonsai.nix").display().to_string(),
            "--argstr".into(),
            "system".into(),
            board.nix_system.clone(),
            "--argstr".into(),
            "request".into(),
            request,
        ];
        match source {
            PackageSource::Offline => {
                let inputs = offline::prepare(root, board.arch)?;
                let host_arch = offline::host_arch()?;
                let cc = if board.arch == host_arch {
                    "gcc".to_string()
                } else {
                    format!("{}-linux-gnu-gcc", board.arch.name())
                };
                let toolchain = if host::find_program(&cc).is_some() {
                    host::version_line(&cc)?
                } else {
                    "none".into()
                };
                args.extend([
                    "--argstr".into(),
                    "hostSystem".into(),
                    format!("{}-linux", host_arch.name()),
                    "--arg".into(),
                    "debs".into(),
                    inputs.debs.display().to_string(),
                    "--arg".into(),
                    "bootstrap".into(),
                    inputs.bootstrap.display().to_string(),
                    "--argstr".into(),
                    "toolchainId".into(),
                    toolchain,
                ]);
            }
            PackageSource::Nixpkgs(r) => {
                args.extend(["--argstr".into(), "source".into(), "nixpkgs".into()]);
                let as_path = Path::new(r);
                if as_path.exists() {
                    let abs = as_path
                        .canonicalize()
                        .with_context(|| format!("resolving --nixpkgs {r}"))?;
                    args.extend(["--arg".into(), "nixpkgs".into(), abs.display().to_string()]);
                } else {
                    args.extend(["--argstr".into(), "nixpkgsFlake".into(), r.clone()]);
                }
            }
        }
        Ok(Eval { args })
    }

    /// Builds the given attributes of nix/bonsai.nix and returns their output paths in order.
    pub fn build(&self, attrs: &[String], what: &str) -> Result<Vec<PathBuf>> {
        let mut cmd = Command::new("nix-build");
        cmd.args(&self.args).arg("--no-out-link");
        for a in attrs {
            cmd.arg("-A").arg(a);
        }
        let out = run_nix(cmd, what)?;
        let paths: Vec<PathBuf> = out
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(PathBuf::from)
            .collect();
        if paths.len() != attrs.len() {
            bail!(
                "nix-build returned {} paths for {} attributes ({what})",
                paths.len(),
                attrs.len()
            );
        }
        Ok(paths)
    }
}

/// Runs a Nix command, streaming what it builds as progress, and returns its stdout. On
/// failure, the error is bonsai's own message from the evaluation if there is one, else the
/// last lines of Nix's log.
fn run_nix(mut cmd: Command, what: &str) -> Result<String> {
    host::ensure(&[host::NIX], &[])?;
    for (k, v) in host::nix_env() {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running nix-build")?;
    let stdout = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut log: Vec<String> = Vec::new();
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if let Some(rest) = line.strip_prefix("building '") {
            let drv = rest.split('\'').next().unwrap_or(rest);
            let name = drv.rsplit('/').next().unwrap_or(drv);
            let name = name.get(33..).unwrap_or(name).trim_end_matches(".drv");
            let hint = if name.starts_with("linux-")
                && !name.contains("config")
                && !name.ends_with(".tar.xz")
            {
                " (a kernel: several minutes when cold; Nix caches it)"
            } else {
                ""
            };
            ui::detail(format!("nix: building {name}{hint}"));
        }
        log.push(line);
    }
    let status = child.wait().context("waiting for nix-build")?;
    let stdout = out_thread.join().unwrap_or_default();
    if !status.success() {
        if let Some(msg) = log.iter().find_map(|l| {
            l.split("error: bonsai: ")
                .nth(1)
                .or_else(|| l.split("bonsai: ").nth(1).filter(|_| l.contains("error")))
        }) {
            bail!("{what}: {}", msg.trim());
        }
        bail!("{what}: {}", failure_summary(&log));
    }
    Ok(stdout)
}

/// Longest piece of a log line quoted in an error.
const QUOTE_MAX: usize = 200;

/// One line saying why a Nix command failed, from its log (never the whole log): the
/// builder that failed, the lines of its output that mention an error (else its last
/// lines), at most three, and how to read the full log; or the evaluation error and where
/// it is.
pub fn failure_summary(log: &[String]) -> String {
    let cut = |l: &str| -> String {
        let l = l.trim();
        match l.char_indices().nth(QUOTE_MAX) {
            Some((i, _)) => format!("{}...", &l[..i]),
            None => l.to_string(),
        }
    };
    let builder = log
        .iter()
        .position(|l| l.starts_with("error: builder for '"));
    if let Some(i) = builder {
        let rest = &log[i]["error: builder for '".len()..];
        let drv = rest.split('\'').next().unwrap_or(rest);
        let name = drv.rsplit('/').next().unwrap_or(drv);
        let name = name.get(33..).unwrap_or(name).trim_end_matches(".drv");
        let status = rest
            .split_once("' ")
            .map_or("failed", |(_, s)| s)
            .trim_end_matches([';', '.'])
            .trim();
        // Newer Nix quotes the last lines after the error (`> line`); nix-build 2.8 prints the
        // builder's output before it.
        let quoted: Vec<&str> = log[i + 1..]
            .iter()
            .filter_map(|l| l.trim_start().strip_prefix('>'))
            .collect();
        let output: Vec<&str> = if quoted.is_empty() {
            // From where this builder started (other builders may have printed before).
            let start = log[..i]
                .iter()
                .rposition(|l| l.starts_with(&format!("building '{drv}'")))
                .map_or(0, |b| b + 1);
            log[start..i]
                .iter()
                .map(String::as_str)
                .filter(|l| !is_nix_chatter(l))
                .collect()
        } else {
            quoted
        };
        let output: Vec<&str> = output
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let errors: Vec<&str> = output
            .iter()
            .copied()
            .filter(|l| l.to_ascii_lowercase().contains("error"))
            .collect();
        let picked = if errors.is_empty() { &output } else { &errors };
        let picked: Vec<String> = picked[picked.len().saturating_sub(3)..]
            .iter()
            .map(|l| cut(l))
            .collect();
        let lines = if picked.is_empty() {
            String::new()
        } else {
            format!(": {}", picked.join(" | "))
        };
        return format!("builder for {name} {status}{lines} (full log: nix-store -l {drv})");
    }
    // An evaluation error: `error: <message>`, then `at <file>:<line>:<column>:` and the
    // source. Newer Nix puts a trace first and the innermost `error: ...` last.
    let Some(first) = log.iter().position(|l| l.starts_with("error:")) else {
        let tail: Vec<String> = log
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| cut(l))
            .collect();
        let tail = &tail[tail.len().saturating_sub(3)..];
        return format!("Nix failed; last lines of its log: {}", tail.join(" | "));
    };
    let mut message = log[first]["error:".len()..].trim().to_string();
    let mut message_at = first;
    if message.is_empty() {
        if let Some(j) = log[first + 1..]
            .iter()
            .rposition(|l| l.trim_start().starts_with("error: "))
        {
            message_at = first + 1 + j;
            message = log[message_at].trim()["error:".len()..].trim().to_string();
        }
    }
    let at = log[message_at + 1..]
        .iter()
        .chain(log[first..message_at].iter().rev())
        .map(|l| l.trim())
        .find(|l| l.starts_with("at /") || l.starts_with("at «"))
        .map(|l| l.trim_end_matches(':').to_string());
    match at {
        Some(at) => format!("Nix evaluation failed: {} {at}", cut(&message)),
        None => format!("Nix evaluation failed: {}", cut(&message)),
    }
}

/// Nix's own progress lines, which are not a builder's output.
fn is_nix_chatter(l: &str) -> bool {
    l.starts_with("building '")
        || l.starts_with("these ")
        || l.starts_with("this ")
        || l.starts_with("  /nix/store/")
        || l.starts_with("copying path")
        || l.starts_with("warning:")
        || l.starts_with("error:")
}

/// One store path of a closure.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    pub path: String,
    pub nar_hash: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
}

/// The closure of `roots`: every store path they reference, directly or not.
pub fn closure(roots: &[PathBuf]) -> Result<BTreeMap<String, PathInfo>> {
    let mut cmd = Command::new("nix");
    cmd.args(["path-info", "--json", "--recursive"]).args(roots);
    let out = run_nix(cmd, "reading the closure")?;
    let infos: Vec<PathInfo> =
        serde_json::from_str(&out).context("parsing nix path-info --json")?;
    Ok(infos.into_iter().map(|i| (i.path.clone(), i)).collect())
}

/// The kernel image file inside a kernel package's output.
pub fn kernel_image(kernel: &Path, arch: Arch) -> Result<PathBuf> {
    let names: &[&str] = match arch {
        Arch::X86_64 => &["bzImage", "vmlinuz"],
        Arch::Aarch64 => &["Image", "vmlinuz"],
    };
    names
        .iter()
        .map(|n| kernel.join(n))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "kernel package {} holds no {}",
                kernel.display(),
                names.join(" or ")
            )
        })
}

/// A device tree inside a kernel package's output (`dtbs/<vendor>/<board>.dtb`, as Nixpkgs'
/// kernels and the offline set install them).
pub fn kernel_dtb(kernel: &Path, dtb: &str) -> Result<PathBuf> {
    let p = kernel.join("dtbs").join(dtb);
    if !p.is_file() {
        bail!(
            "the kernel package {} holds no dtbs/{dtb} (does the kernel config enable that platform and CONFIG_OF?)",
            kernel.display()
        );
    }
    Ok(p)
}

/// One line of the kernel-config report: an option a fragment set, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOption {
    pub option: String,
    pub wanted: String,
    pub got: String,
    pub fragment: String,
    pub survived: bool,
    /// For a dropped option: what Kconfig says it depends on.
    pub reason: String,
}

pub fn read_config_report(dir: &Path) -> Result<Vec<ConfigOption>> {
    let text = std::fs::read_to_string(dir.join("report"))
        .with_context(|| format!("reading {}/report", dir.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 5).then(|| ConfigOption {
                option: f[0].into(),
                wanted: f[1].into(),
                got: f[2].into(),
                fragment: f[3].into(),
                survived: f[4] == "ok",
                reason: f.get(5).map(|r| r.to_string()).unwrap_or_default(),
            })
        })
        .collect())
}

#[cfg(test)]
mod failure_tests {
    use super::failure_summary;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn a_failed_builder_is_named_with_its_error_lines() {
        // nix-build 2.8: the builder's output comes before the error.
        let log = lines(
            "these 2 derivations will be built:
  /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv
building '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv'...
/nix/store/smm-hello.c:18:5: error: conflicting types for 'main'
   18 | int main(void) { return x; }
      |     ^~~~
/nix/store/smm-hello.c:18:25: note: each undeclared identifier is reported only once
error: builder for '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv' failed with exit code 1
error: 1 dependencies of derivation '/nix/store/abc-bonsai.drv' failed to build",
        );
        assert_eq!(
            failure_summary(&log),
            "builder for hello-1.0 failed with exit code 1: /nix/store/smm-hello.c:18:5: error: \
             conflicting types for 'main' (full log: nix-store -l \
             /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv)"
        );
        // Newer Nix: the last lines quoted after the error; no error line, so the last three.
        let log = lines(
            "error: builder for '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv' failed with exit code 2;
       last 10 log lines:
       > one
       > two
       > three
       > four
       For full logs, run 'nix log /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv'.",
        );
        assert_eq!(
            failure_summary(&log),
            "builder for x-1.0 failed with exit code 2: two | three | four (full log: \
             nix-store -l /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv)"
        );
    }

    #[test]
    fn an_evaluation_error_is_its_message_and_position() {
        let log = lines(
            "error: syntax error, unexpected ';'

       at /tmp/scr3/nix/bonsai.nix:20:35:

           19| let
           20|   req = builtins.fromJSON request;;
             |                                   ^
           21|",
        );
        assert_eq!(
            failure_summary(&log),
            "Nix evaluation failed: syntax error, unexpected ';' at /tmp/scr3/nix/bonsai.nix:20:35"
        );
        let log = lines(
            "error:
       … while evaluating the attribute 'packages'

         at /x/bonsai.nix:3:1:

       error: undefined variable 'nope'

       at /x/offline/default.nix:7:9:",
        );
        assert_eq!(
            failure_summary(&log),
            "Nix evaluation failed: undefined variable 'nope' at /x/offline/default.nix:7:9"
        );
        assert_eq!(
            failure_summary(&lines("a\n\nb\nc\nd")),
            "Nix failed; last lines of its log: b | c | d"
        );
    }
}
