//! A profile's `[kernel] modules` in the image: the named modules and everything they depend on,
//! resolved from the kernel's `modules.dep` as Nixpkgs' `makeModulesClosure` does, copied to
//! `/lib/modules/<version>/` with a `modules.dep` and `modules.alias` cut down to them, so that
//! busybox `modprobe` finds them by name and by modalias.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use rootfs::system::module_name;

/// One module of `modules.dep`: its path (relative to the version folder) and its dependencies'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dep {
    pub path: String,
    pub needs: Vec<String>,
}

/// `modules.dep`: module name -> its entry.
pub fn parse_dep(text: &str) -> BTreeMap<String, Dep> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let Some((path, needs)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim().to_string();
        let name = path
            .rsplit('/')
            .next()
            .unwrap_or(&path)
            .split(".ko")
            .next()
            .unwrap_or_default();
        m.insert(
            module_name(name),
            Dep {
                needs: needs.split_whitespace().map(String::from).collect(),
                path,
            },
        );
    }
    m
}

/// The named modules and everything they depend on: their paths, sorted. A name that is not in
/// `modules.dep` is an error naming it and the modules there are.
pub fn closure(deps: &BTreeMap<String, Dep>, names: &[String]) -> Result<BTreeSet<String>, String> {
    let by_path: BTreeMap<&str, &Dep> = deps.values().map(|d| (d.path.as_str(), d)).collect();
    let mut kept = BTreeSet::new();
    let mut queue: Vec<&Dep> = Vec::new();
    for n in names {
        let d = deps.get(&module_name(n)).ok_or_else(|| {
            let known: Vec<&str> = deps.keys().map(String::as_str).collect();
            format!(
                "no module '{n}' in the kernel's modules.dep (it has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?;
        queue.push(d);
    }
    while let Some(d) = queue.pop() {
        if !kept.insert(d.path.clone()) {
            continue;
        }
        for n in &d.needs {
            let dep = by_path.get(n.as_str()).ok_or_else(|| {
                format!("modules.dep: {} needs {n}, which it does not list", d.path)
            })?;
            queue.push(dep);
        }
    }
    Ok(kept)
}

/// The lines of `modules.dep` for the kept modules only.
pub fn cut_dep(text: &str, kept: &BTreeSet<String>) -> String {
    text.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(p, _)| kept.contains(p.trim()))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The lines of `modules.alias` for the kept modules only (`alias <pattern> <module>`).
pub fn cut_alias(text: &str, kept_names: &BTreeSet<String>) -> String {
    text.lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() == 3 && w[0] == "alias" && kept_names.contains(&module_name(w[2]))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The one `lib/modules/<version>` folder of a kernel's `modules` output.
pub fn version_dir(modules_out: &Path) -> Result<(String, PathBuf)> {
    let base = modules_out.join("lib/modules");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&base).with_context(|| format!("reading {}", base.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    match found.as_slice() {
        [v] => Ok((v.clone(), base.join(v))),
        _ => bail!(
            "{}: expected one kernel version folder, found {}",
            base.display(),
            found.len()
        ),
    }
}

/// A file for the image: its path there and its node.
pub type ImageFile = (String, rootfs::Node);

/// A read-only file copied from the store path `owner` (named in the manifest).
fn store_file(host: PathBuf, owner: &Path) -> rootfs::Node {
    let mut n = rootfs::Node::file(rootfs::Source::Host(host), 0o444);
    n.owner = Some(owner.display().to_string());
    n
}

/// The image's files for `names`: every kept `.ko` (from the store) and the cut-down
/// `modules.dep` and `modules.alias`, under `lib/modules/<version>/`.
pub fn image_files(modules_out: &Path, names: &[String]) -> Result<(Vec<ImageFile>, Vec<String>)> {
    let (version, dir) = version_dir(modules_out)?;
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let dep_text = read("modules.dep")?;
    let deps = parse_dep(&dep_text);
    let kept =
        closure(&deps, names).map_err(|e| anyhow::anyhow!("{}: {e}", modules_out.display()))?;
    let kept_names: BTreeSet<String> = deps
        .iter()
        .filter(|(_, d)| kept.contains(&d.path))
        .map(|(n, _)| n.clone())
        .collect();
    let alias_text = read("modules.alias").unwrap_or_default();
    let at = format!("lib/modules/{version}");
    let mut files = Vec::new();
    for p in &kept {
        files.push((format!("{at}/{p}"), store_file(dir.join(p), modules_out)));
    }
    files.push((
        format!("{at}/modules.dep"),
        rootfs::Node::file(
            rootfs::Source::Bytes(cut_dep(&dep_text, &kept).into_bytes()),
            0o444,
        ),
    ));
    files.push((
        format!("{at}/modules.alias"),
        rootfs::Node::file(
            rootfs::Source::Bytes(cut_alias(&alias_text, &kept_names).into_bytes()),
            0o444,
        ),
    ));
    Ok((files, kept_names.into_iter().collect()))
}

/// What the kept modules ask for (`modinfo -F firmware`): (module, file), in module order.
pub fn firmware_asked(files: &[ImageFile]) -> Result<Vec<(String, String)>> {
    let mut asked = Vec::new();
    for (path, node) in files {
        let Some(name) = path.strip_suffix(".ko").and_then(|p| p.rsplit('/').next()) else {
            continue;
        };
        let rootfs::NodeKind::File {
            source: rootfs::Source::Host(host),
        } = &node.kind
        else {
            continue;
        };
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let info = rootfs::modinfo(&data)
            .with_context(|| format!("{}: not a kernel module (no .modinfo)", host.display()))?;
        for (k, v) in info {
            if k == "firmware" {
                asked.push((module_name(name), v));
            }
        }
    }
    Ok(asked)
}

/// A firmware file name as `request_firmware` takes it: relative, no `..`.
fn firmware_name_ok(f: &str) -> bool {
    !f.is_empty()
        && !f.starts_with('/')
        && f.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The image's `/lib/firmware` files: every file `[firmware] files` names (an error when no
/// package has it) and every one a kept module asks for that a package has (a warning, which the
/// caller prints, when none has it: drivers list every firmware version they can use). Each is
/// looked up in the packages' `lib/firmware/`, first package first.
pub fn firmware_files(
    packages: &[PathBuf],
    named: &[String],
    asked: &[(String, String)],
) -> Result<(Vec<ImageFile>, Vec<String>)> {
    let find = |f: &str| {
        packages
            .iter()
            .map(|p| (p.join("lib/firmware").join(f), p.clone()))
            .find(|(f, _)| f.is_file())
    };
    let mut files: BTreeMap<String, (PathBuf, PathBuf)> = BTreeMap::new();
    let mut warnings = Vec::new();
    for f in named {
        if !firmware_name_ok(f) {
            bail!(
                "key 'firmware.files': '{f}' is not a firmware file name (relative, without '..')"
            );
        }
        let host = find(f).with_context(|| {
            format!(
                "key 'firmware.files': no package of the profile has lib/firmware/{f} (add the firmware package to `packages`)"
            )
        })?;
        files.insert(f.clone(), host);
    }
    for (module, f) in asked {
        if files.contains_key(f) {
            continue;
        }
        match find(f).filter(|_| firmware_name_ok(f)) {
            Some(host) => {
                files.insert(f.clone(), host);
            }
            None => warnings.push(format!(
                "kernel module {module} asks for firmware {f}, which no package of the profile has: the image goes without it (name it in [firmware] files to make this an error)"
            )),
        }
    }
    let files = files
        .into_iter()
        .map(|(f, (host, pkg))| (format!("lib/firmware/{f}"), store_file(host, &pkg)))
        .collect();
    Ok((files, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/virtio/virtio_balloon.ko:\n\
kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko kernel/fs/nls/nls-base.ko\n\
kernel/fs/fat/fat.ko: kernel/fs/nls/nls-base.ko\n\
kernel/fs/nls/nls-base.ko:\n\
kernel/lib/test_firmware.ko:\n";

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_closure_follows_modules_dep_and_nothing_else() {
        let deps = parse_dep(DEP);
        assert_eq!(deps["nls_base"].path, "kernel/fs/nls/nls-base.ko");
        let kept = closure(&deps, &names(&["vfat"])).unwrap();
        assert_eq!(
            kept.into_iter().collect::<Vec<_>>(),
            [
                "kernel/fs/fat/fat.ko",
                "kernel/fs/fat/vfat.ko",
                "kernel/fs/nls/nls-base.ko"
            ]
        );
        // `-` and `_` are one to modprobe.
        assert_eq!(closure(&deps, &names(&["nls-base"])).unwrap().len(), 1);
        let e = closure(&deps, &names(&["virtio-nope"])).unwrap_err();
        assert!(
            e.starts_with(
                "no module 'virtio-nope' in the kernel's modules.dep (it has: fat, nls_base"
            ),
            "{e}"
        );
        let broken = parse_dep("kernel/a.ko: kernel/gone.ko\n");
        assert!(closure(&broken, &names(&["a"]))
            .unwrap_err()
            .contains("kernel/gone.ko"));
    }

    #[test]
    fn dep_and_alias_are_cut_to_the_kept_modules() {
        let kept = closure(&parse_dep(DEP), &names(&["fat"])).unwrap();
        assert_eq!(
            cut_dep(DEP, &kept),
            "kernel/fs/fat/fat.ko: kernel/fs/nls/nls-base.ko\nkernel/fs/nls/nls-base.ko:\n"
        );
        let alias = "# Aliases extracted from modules themselves.\n\
alias virtio:d00000005v* virtio_balloon\n\
alias fs-vfat vfat\n\
alias fs-fat fat\n";
        let kept_names: BTreeSet<String> = ["fat".to_string(), "nls_base".to_string()].into();
        assert_eq!(cut_alias(alias, &kept_names), "alias fs-fat fat\n");
    }

    #[test]
    fn firmware_is_named_or_asked_for_and_found_in_the_packages() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::create_dir_all(a.join("lib/firmware/vendor")).unwrap();
        std::fs::create_dir_all(b.join("lib/firmware")).unwrap();
        std::fs::write(a.join("lib/firmware/vendor/chip.bin"), "a").unwrap();
        std::fs::write(b.join("lib/firmware/regulatory.db"), "RGDB").unwrap();
        let pkgs = vec![a.clone(), b.clone()];
        let asked = vec![
            ("chipdrv".to_string(), "vendor/chip.bin".to_string()),
            ("chipdrv".to_string(), "vendor/chip-v2.bin".to_string()),
        ];
        let (files, warnings) =
            firmware_files(&pkgs, &["regulatory.db".to_string()], &asked).unwrap();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["lib/firmware/regulatory.db", "lib/firmware/vendor/chip.bin"]
        );
        assert_eq!(
            warnings,
            ["kernel module chipdrv asks for firmware vendor/chip-v2.bin, which no package of the profile has: the image goes without it (name it in [firmware] files to make this an error)"]
        );
        let e = firmware_files(&pkgs, &["nope.bin".to_string()], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "key 'firmware.files': no package of the profile has lib/firmware/nope.bin (add the firmware package to `packages`)"
        );
        let e = firmware_files(&pkgs, &["../etc/shadow".to_string()], &[]).unwrap_err();
        assert!(e.to_string().contains("not a firmware file name"), "{e}");
    }

    #[test]
    fn image_files_come_from_the_one_version_folder() {
        let d = tempfile::tempdir().unwrap();
        let v = d.path().join("lib/modules/6.1.192");
        std::fs::create_dir_all(v.join("kernel/drivers/virtio")).unwrap();
        std::fs::write(
            v.join("modules.dep"),
            "kernel/drivers/virtio/virtio_balloon.ko:\nkernel/lib/test_firmware.ko:\n",
        )
        .unwrap();
        std::fs::write(
            v.join("modules.alias"),
            "alias virtio:d00000005v* virtio_balloon\n",
        )
        .unwrap();
        let (files, kept) = image_files(d.path(), &names(&["virtio_balloon"])).unwrap();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "lib/modules/6.1.192/kernel/drivers/virtio/virtio_balloon.ko",
                "lib/modules/6.1.192/modules.dep",
                "lib/modules/6.1.192/modules.alias"
            ]
        );
        assert_eq!(kept, ["virtio_balloon"]);
        std::fs::create_dir_all(d.path().join("lib/modules/6.2")).unwrap();
        assert!(image_files(d.path(), &names(&["virtio_balloon"]))
            .unwrap_err()
            .to_string()
            .contains("found 2"));
    }
}
