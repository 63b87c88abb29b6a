//! The SBOM of a release: CycloneDX 1.5 JSON. One component per store path in the image, with
//! its name and version, Nix narHash (as SHA-256 hex) and NAR size, the package source (the
//! offline set's Debian packages with versions and .deb hashes, or a Nixpkgs reference), and
//! the license where the package's Debian copyright file says one. Timestamps come from
//! SOURCE_DATE_EPOCH; the serial number is derived from the image's hash: no clock, no
//! randomness, no host paths.

use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::nix::PathInfo;

/// `glibc-2.36-9+deb12u14` → (`glibc`, `2.36-9+deb12u14`): Nix's rule, the version starts at
/// the first `-` followed by a digit. A split output's suffix (`execline-2.9.3.0-bin`) is not
/// part of the version: see [`split_output`].
pub fn split_name(store_path: &str) -> (String, String) {
    let (name, version, _) = split_output(store_path);
    (name, version)
}

/// The outputs Nixpkgs' multiple-output packages name their store paths with
/// (`<pname>-<version>-<output>`; `out` has no suffix).
const OUTPUTS: &[&str] = &[
    "bin", "lib", "dev", "man", "doc", "devdoc", "info", "static", "debug", "getent", "modules",
    "dist", "lout", "py",
];

/// (`name`, `version`, `output`) of a store path: `/nix/store/<hash>-s6-2.13.1.0-dev` →
/// (`s6`, `2.13.1.0`, `dev`); an output without a suffix is `out`.
pub fn split_output(store_path: &str) -> (String, String, String) {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let full = base.get(33..).unwrap_or(base);
    let (stem, output) = match full.rsplit_once('-') {
        Some((stem, o)) if OUTPUTS.contains(&o) => (stem, o),
        _ => (full, "out"),
    };
    let bytes = stem.as_bytes();
    for i in 0..bytes.len().saturating_sub(1) {
        if bytes[i] == b'-' && bytes[i + 1].is_ascii_digit() {
            return (
                stem[..i].to_string(),
                stem[i + 1..].to_string(),
                output.to_string(),
            );
        }
    }
    // No version: a suffix is then part of the name (`hello-bin` is a name).
    (full.to_string(), String::new(), "out".to_string())
}

/// One store path as a component: name and version by Nixpkgs' naming, its output, the
/// SHA-256 of its NAR, and where it came from.
fn component(p: &PathInfo, source: &str, kind: &str) -> Value {
    let (name, version, output) = split_output(&p.path);
    let mut props = vec![
        json!({"name": "nix:store-path", "value": p.path}),
        json!({"name": "nix:output", "value": output}),
        json!({"name": "nix:nar-hash", "value": p.nar_hash}),
        json!({"name": "nix:nar-size", "value": p.nar_size.to_string()}),
        json!({"name": "bonsai:package-source", "value": source}),
    ];
    for (pkg, ver, sha) in debian_packages(&p.path) {
        props.push(json!({"name": "debian:package", "value": format!("{pkg}={ver} sha256:{sha}")}));
    }
    let mut c = json!({
        "type": kind,
        "bom-ref": p.path,
        "name": name,
        "version": version,
        "hashes": [{"alg": "SHA-256", "content": crate::digest::hex(&p.nar_sha256)}],
        "properties": props,
    });
    if let Some(l) = debian_license(&p.path) {
        c["licenses"] = json!([{"license": {"name": l}}]);
    }
    c
}

/// The first `License:` of a Debian copyright file in the store path, if any.
fn debian_license(store_path: &str) -> Option<String> {
    let doc = Path::new(store_path).join("share/doc");
    for entry in std::fs::read_dir(doc).ok()?.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("copyright")) {
            if let Some(l) = text.lines().find_map(|l| l.strip_prefix("License:")) {
                let l = l.trim();
                if !l.is_empty() {
                    return Some(l.to_string());
                }
            }
        }
    }
    None
}

fn debian_packages(store_path: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(Path::new(store_path).join("nix-support/debian-packages"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
}

/// The kernel as a component: its package output and how it was configured.
pub struct Kernel<'a> {
    pub info: &'a PathInfo,
    /// `tinyconfig + kernel-configs/qemu-x86_64.config`, or `package linux`.
    pub config_source: &'a str,
    /// SHA-256 (hex) of the merged config (`<kernelConfig>/config`); `None` for a prebuilt kernel.
    pub config_sha256: Option<&'a str>,
}

pub struct SbomInput<'a> {
    pub board: &'a str,
    pub version: &'a str,
    pub profile: &'a str,
    pub init: &'a str,
    pub source: &'a str,
    pub epoch: u64,
    pub initramfs_sha256: &'a str,
    pub kernel_sha256: &'a str,
    pub paths: &'a [PathInfo],
    /// The kernel's store path, when it is known.
    pub kernel: Option<Kernel<'a>>,
    /// The profile says `development = true` (an empty password may be in the image).
    pub development: bool,
    /// Image paths of files supplied at build time from outside the repository.
    pub secrets: &'a [String],
    /// The boot loader on the release's disk image (systemd-boot, U-Boot), when it has one.
    pub boot_loader: Option<&'a crate::image::LoaderInfo>,
    /// `[image] forbid`: store path name globs the build checked the image against.
    pub forbid: &'a [String],
    /// `[overrides.<attribute>]` the packages were built with.
    pub overrides: &'a std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::OverrideArg>,
    >,
}

/// ISO 8601 UTC for a Unix time, without a clock or a time-zone database.
pub fn iso8601(epoch: u64) -> String {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub fn cyclonedx(input: &SbomInput) -> Value {
    let mut components: Vec<Value> = input
        .paths
        .iter()
        .map(|p| component(p, input.source, "library"))
        .collect();
    if let Some(k) = &input.kernel {
        let mut c = component(k.info, input.source, "operating-system");
        if let Some(props) = c["properties"].as_array_mut() {
            props.push(json!({"name": "bonsai:kernel-config", "value": k.config_source}));
            if let Some(sha) = k.config_sha256 {
                props.push(json!({"name": "bonsai:kernel-config-sha256", "value": sha}));
            }
        }
        components.push(c);
    }
    if let Some(l) = input.boot_loader {
        components.push(json!({
            "type": "firmware",
            "bom-ref": format!("debian:{}", l.package),
            "name": l.package,
            "version": l.version,
            "hashes": [{"alg": "SHA-256", "content": l.sha256}],
            "properties": [
                {"name": "bonsai:disk-path", "value": l.path},
                {"name": "bonsai:package-source", "value": "debian (pinned in nix/offline/<arch>.lock.json)"},
            ],
        }));
    }
    let mut h = Sha256::new();
    h.update(input.board.as_bytes());
    h.update(input.version.as_bytes());
    h.update(input.initramfs_sha256.as_bytes());
    h.update(input.kernel_sha256.as_bytes());
    let d = h.finalize();
    let hex = crate::digest::hex(&d);
    // A version-4-shaped UUID from the image's hash: the same image, the same serial number.
    let uuid = format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    );
    let mut image_props = vec![
        json!({"name": "bonsai:profile", "value": input.profile}),
        json!({"name": "bonsai:init", "value": input.init}),
        json!({"name": "bonsai:kernel-sha256", "value": input.kernel_sha256}),
    ];
    // Marked only when true, so other images' SBOMs keep their bytes.
    if input.development {
        image_props.push(json!({"name": "bonsai:development-image", "value": "true"}));
    }
    // What the release guarantees to leave out, and the package overrides it was built with.
    for pattern in input.forbid {
        image_props.push(json!({"name": "bonsai:forbid", "value": pattern}));
    }
    for (attr, args) in input.overrides {
        for (arg, a) in args {
            let value = format!("{attr}.{arg} = {} ({})", a.value, a.profile);
            image_props.push(json!({"name": "bonsai:override", "value": value}));
        }
    }
    if !input.secrets.is_empty() {
        image_props.push(json!({"name": "bonsai:holds-secrets", "value": "true"}));
        for path in input.secrets {
            image_props.push(json!({"name": "bonsai:secret", "value": path}));
        }
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!("urn:uuid:{uuid}"),
        "version": 1,
        "metadata": {
            "timestamp": iso8601(input.epoch),
            "tools": {"components": [{"type": "application", "name": "bonsai", "version": env!("CARGO_PKG_VERSION")}]},
            "component": {
                "type": "operating-system",
                "bom-ref": format!("bonsai-image:{}", input.board),
                "name": input.board,
                "version": input.version,
                "hashes": [{"alg": "SHA-256", "content": input.initramfs_sha256}],
                "properties": image_props,
            },
        },
        "components": components,
        "dependencies": [{
            "ref": format!("bonsai-image:{}", input.board),
            "dependsOn": input
                .paths
                .iter()
                .chain(input.kernel.as_ref().map(|k| k.info))
                .map(|p| p.path.clone())
                .chain(input.boot_loader.map(|l| format!("debian:{}", l.package)))
                .collect::<Vec<_>>(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Overrides = std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::OverrideArg>,
    >;
    static NO_OVERRIDES: Overrides = std::collections::BTreeMap::new();

    #[test]
    fn forbidden_patterns_and_overrides_are_stated() {
        let mut overrides = Overrides::new();
        overrides.entry("busybox".into()).or_default().insert(
            "enableStatic".into(),
            crate::config::OverrideArg {
                value: serde_json::json!(true),
                profile: "tiny".into(),
            },
        );
        let forbid = vec!["systemd".to_string(), "openssl*".to_string()];
        let doc = cyclonedx(&SbomInput {
            board: "b",
            version: "1",
            profile: "tiny",
            init: "busybox",
            source: "offline",
            epoch: 0,
            initramfs_sha256: "00",
            kernel_sha256: "11",
            paths: &[],
            kernel: None,
            development: false,
            secrets: &[],
            boot_loader: None,
            forbid: &forbid,
            overrides: &overrides,
        });
        let props = doc["metadata"]["component"]["properties"]
            .as_array()
            .unwrap();
        for (name, value) in [
            ("bonsai:forbid", "systemd"),
            ("bonsai:forbid", "openssl*"),
            ("bonsai:override", "busybox.enableStatic = true (tiny)"),
        ] {
            assert!(
                props.contains(&serde_json::json!({"name": name, "value": value})),
                "{name}={value} missing from {props:?}"
            );
        }
    }

    #[test]
    fn development_images_and_secrets_are_marked_only_when_true() {
        let secrets = vec!["/etc/dropbear/dropbear_ed25519_host_key".to_string()];
        let input = |development, secrets: &'static [String]| SbomInput {
            board: "b",
            version: "1",
            profile: "p",
            init: "busybox",
            source: "offline",
            epoch: 0,
            initramfs_sha256: "00",
            kernel_sha256: "11",
            paths: &[],
            kernel: None,
            development,
            secrets,
            boot_loader: None,
            forbid: &[],
            overrides: &NO_OVERRIDES,
        };
        let names = |doc: &Value| -> Vec<String> {
            doc["metadata"]["component"]["properties"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    format!(
                        "{}={}",
                        p["name"].as_str().unwrap(),
                        p["value"].as_str().unwrap()
                    )
                })
                .collect()
        };
        let plain = names(&cyclonedx(&input(false, &[])));
        assert!(
            plain
                .iter()
                .all(|n| !n.contains("development") && !n.contains("secret")),
            "{plain:?}"
        );
        let secrets: &'static [String] = Box::leak(secrets.into_boxed_slice());
        let marked = names(&cyclonedx(&input(true, secrets)));
        for want in [
            "bonsai:development-image=true",
            "bonsai:holds-secrets=true",
            "bonsai:secret=/etc/dropbear/dropbear_ed25519_host_key",
        ] {
            assert!(
                marked.iter().any(|n| n == want),
                "{want} missing from {marked:?}"
            );
        }
    }

    #[test]
    fn names_and_versions_split_like_nix() {
        assert_eq!(
            split_name("/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-glibc-2.36-9+deb12u14"),
            ("glibc".into(), "2.36-9+deb12u14".into())
        );
        assert_eq!(
            split_name("/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-hello.c"),
            ("hello.c".into(), String::new())
        );
    }

    #[test]
    fn split_outputs_keep_their_version() {
        let h = "/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-";
        let cases = [
            ("execline-2.9.3.0-bin", ("execline", "2.9.3.0", "bin")),
            ("skalibs-2.14.3.0-lib", ("skalibs", "2.14.3.0", "lib")),
            ("s6-2.13.1.0-dev", ("s6", "2.13.1.0", "dev")),
            ("runit-2.2.0-man", ("runit", "2.2.0", "man")),
            ("glibc-2.40-66-bin", ("glibc", "2.40-66", "bin")),
            ("glibc-2.36-9+deb12u14", ("glibc", "2.36-9+deb12u14", "out")),
            ("linux-6.1.192", ("linux", "6.1.192", "out")),
            ("libxcrypt-4.4.38", ("libxcrypt", "4.4.38", "out")),
            ("hello.c", ("hello.c", "", "out")),
            ("hello-bin", ("hello-bin", "", "out")),
        ];
        for (base, (n, v, o)) in cases {
            assert_eq!(
                split_output(&format!("{h}{base}")),
                (n.to_string(), v.to_string(), o.to_string()),
                "{base}"
            );
        }
    }

    fn info(base: &str, nar_hash: &str) -> PathInfo {
        PathInfo {
            path: format!("/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-{base}"),
            nar_hash: nar_hash.into(),
            nar_sha256: crate::nix::sha256_of(nar_hash).unwrap(),
            nar_size: 520,
            references: vec![],
        }
    }

    #[test]
    fn every_component_and_the_kernel_have_a_sha256_and_the_schema_holds() {
        // The same NAR hash in the three forms Nix prints (see nix.rs's tests).
        let paths = [
            info(
                "execline-2.9.3.0-bin",
                "sha256-xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1HA=",
            ),
            info(
                "skalibs-2.14.3.0-lib",
                "sha256:0w6lwg16jqjwmj7qlv2l3p6242il03i1pzaahjn05913l6aq1765",
            ),
            info(
                "busybox-1.36.1",
                "sha256:c59c8095a123a402ac844afd1be200340a22cc1d546c8a8fac5c6269c2e3d470",
            ),
        ];
        let kernel = info(
            "linux-6.1.192",
            "sha256-xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1HA=",
        );
        let config_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let loader = crate::image::LoaderInfo {
            package: "systemd-boot-efi".into(),
            version: "252.39-1~deb12u2".into(),
            path: "EFI/BOOT/BOOTX64.EFI".into(),
            sha256: config_sha.into(),
        };
        let doc = cyclonedx(&SbomInput {
            board: "qemu-x86_64",
            version: "1",
            profile: "minimal",
            init: "busybox",
            source: "offline",
            epoch: 0,
            initramfs_sha256: config_sha,
            kernel_sha256: config_sha,
            paths: &paths,
            kernel: Some(Kernel {
                info: &kernel,
                config_source: "tinyconfig + kernel-configs/qemu-x86_64.config",
                config_sha256: Some(config_sha),
            }),
            development: false,
            secrets: &[],
            boot_loader: Some(&loader),
            forbid: &[],
            overrides: &NO_OVERRIDES,
        });
        let components = doc["components"].as_array().unwrap();
        assert_eq!(components.len(), 5);
        // The disk's boot loader: its Debian package, version and hash.
        let l = &components[4];
        assert_eq!(
            (&l["type"], &l["name"], &l["version"]),
            (
                &json!("firmware"),
                &json!("systemd-boot-efi"),
                &json!("252.39-1~deb12u2")
            )
        );
        assert_eq!(l["hashes"][0]["content"], config_sha);
        assert!(doc["dependencies"][0]["dependsOn"]
            .as_array()
            .unwrap()
            .contains(&json!("debian:systemd-boot-efi")));
        let components = &components[..4];
        for c in components {
            let hashes = c["hashes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            assert_eq!(
                hashes,
                [
                    json!({"alg": "SHA-256", "content": "c59c8095a123a402ac844afd1be200340a22cc1d546c8a8fac5c6269c2e3d470"})
                ],
                "{c}"
            );
        }
        let versions: Vec<(&str, &str)> = components
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c["version"].as_str().unwrap()))
            .collect();
        assert_eq!(
            versions,
            [
                ("execline", "2.9.3.0"),
                ("skalibs", "2.14.3.0"),
                ("busybox", "1.36.1"),
                ("linux", "6.1.192")
            ]
        );
        let k = &components[3];
        assert_eq!(k["type"], "operating-system");
        let props = k["properties"].as_array().unwrap();
        assert!(
            props.contains(&json!({"name": "bonsai:kernel-config-sha256", "value": config_sha}))
        );
        assert!(props.contains(&json!({"name": "bonsai:kernel-config", "value": "tinyconfig + kernel-configs/qemu-x86_64.config"})));
        assert!(doc["dependencies"][0]["dependsOn"]
            .as_array()
            .unwrap()
            .contains(&json!(kernel.path)));
        // The CycloneDX 1.5 schema, as the release test checks it.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sbom.cdx.json");
        std::fs::write(&f, doc.to_string()).unwrap();
        let v = std::process::Command::new("python3")
            .arg(crate::project_root().join("schemas/validate.py"))
            .arg(&f)
            .output()
            .expect("python3 with jsonschema (cargo xtask test installs it)");
        assert!(
            v.status.success(),
            "SBOM invalid: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }

    #[test]
    fn timestamps_are_utc_without_a_clock() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_764_288_000), "2025-11-28T00:00:00Z");
    }
}
