//! Field updates on the host: `cargo xtask keygen` (a minisign key pair), `cargo xtask bundle`
//! (a release with its signed update bundle) and `cargo xtask delta` (what a device on one
//! release fetches to get another). The format is the `bundle` crate's.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::build::BuildInfo;
use crate::config::INITS;
use crate::ui;

/// Where an image holds the public key bonsai-update checks bundles against, and its settings
/// (`board=`, `tries=`).
pub const IMAGE_KEY: &str = "etc/bonsai/update.pub";
pub const IMAGE_CONF: &str = "etc/bonsai/update.conf";

#[derive(Args, Debug)]
pub struct Keygen {
    /// Writes <prefix>.pub (public, built into images) and <prefix>.key (secret, never)
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing key files
    #[arg(long)]
    pub force: bool,
}

impl Keygen {
    pub fn run(self) -> Result<()> {
        let (public, secret) = key_paths(&self.out);
        for p in [&public, &secret] {
            if p.exists() && !self.force {
                bail!("{}: exists (--force replaces it)", p.display());
            }
        }
        let key = bundle::SecretKey::from_random(&random40()?);
        write_new(&secret, key.to_file().as_bytes(), 0o600)?;
        write_new(&public, key.public_file().as_bytes(), 0o644)?;
        println!(
            "wrote {} (secret: keep it out of the repository) and {} (key id {})",
            secret.display(),
            public.display(),
            key.id()
        );
        Ok(())
    }
}

/// 40 bytes from /dev/urandom: a new key's seed and id.
pub fn random40() -> Result<[u8; 40]> {
    let mut random = [0u8; 40];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("reading /dev/urandom")?;
    Ok(random)
}

/// `<prefix>.pub` and `<prefix>.key`.
pub fn key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = prefix.as_os_str().to_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".pub"), with(".key"))
}

/// Writes `data` to `path` through a temporary file in the same folder (nothing half-written
/// stays at `path`).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write to {}", dir.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.write_all(data)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads a secret key file; errors name it.
pub fn read_secret_key(path: &Path) -> Result<bundle::SecretKey> {
    let text = fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), rootfs::io_message(&e)))?;
    bundle::SecretKey::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[derive(Args, Debug)]
pub struct Bundle {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Release version (default: `git describe --tags --always`)
    #[arg(long)]
    pub version: Option<String>,
    /// The secret key that signs the bundle (cargo xtask keygen); its public half is built
    /// into the image, and bonsai-update on the device accepts only bundles it signed
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Folder that receives <board>-<version>/ (default: out/release)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

impl Bundle {
    pub fn run(self) -> Result<()> {
        let dest = crate::release::Release {
            board: self.board,
            version: self.version,
            profile: self.profile,
            init: self.init,
            out_dir: self.out_dir,
            key: Some(self.key),
        }
        .run()?;
        println!("bundle: {}", dest.display());
        Ok(())
    }
}

/// The data folders a build reads (`BONSAI_ROOT` may point at a copy of them).
pub const DATA_FOLDERS: [&str; 5] = ["boards", "profiles", "kernel-configs", "nix", "examples"];

/// The package the next release changes, and its two versions.
pub const CHANGED_PACKAGE: (&str, &str, &str) = ("hello", "1.0", "1.1");

/// Copies the data folders of `root` to `dest` (afresh) with one package changed: the example
/// program `hello` goes from 1.0 to 1.1, both its Nix version and the line `--version` prints,
/// so that Nix builds a new store path with different bytes. It is the release N+1 of the
/// update test and of the bench's delta comparison; everything else is the same.
pub fn one_package_changed(root: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    for d in DATA_FOLDERS {
        crate::bench::copy_dir(&root.join(d), &dest.join(d))?;
    }
    let (_, old, new) = CHANGED_PACKAGE;
    for (file, from, to) in [
        (
            "examples/hello/default.nix",
            format!("version = \"{old}\";"),
            format!("version = \"{new}\";"),
        ),
        (
            "examples/hello/src/hello.c",
            format!("\"hello (bonsai example) {old}\""),
            format!("\"hello (bonsai example) {new}\""),
        ),
    ] {
        let path = dest.join(file);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if text.matches(&from).count() != 1 {
            bail!("{file}: expected one '{from}' to change for the next release");
        }
        fs::write(&path, text.replace(&from, &to))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The bundle's file names in a release folder of `board` at `version`.
pub fn bundle_names(board: &str, version: &str) -> [String; 3] {
    let stem = format!("{board}-{version}");
    [
        format!("{stem}.bundle"),
        format!("{stem}.manifest"),
        format!("{stem}.manifest.minisig"),
    ]
}

/// A signed bundle of a build: its manifest, the manifest's bytes and signature, and the whole
/// bundle.
pub struct Signed {
    pub manifest: bundle::Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: String,
    pub bytes: Vec<u8>,
    /// The slot's files' total size (before deduplication).
    pub slot_bytes: u64,
}

/// Cuts the build's slot files into chunks and signs the manifest.
pub fn make_bundle(
    board: &str,
    version: &str,
    files: &crate::image::SlotFiles,
    key: &bundle::SecretKey,
) -> Result<Signed> {
    let mut parts: Vec<(&str, &[u8])> = vec![("linux", &files.kernel), ("initrd", &files.initrd)];
    if let Some(d) = &files.dtb {
        parts.push(("dtb", d));
    }
    let (manifest, payload) =
        bundle::Manifest::build(board, version, bundle::Chunking::default(), &parts)
            .map_err(|e| anyhow::anyhow!("{board} {version}: {e}"))?;
    let manifest_bytes = manifest.to_bytes();
    let trusted = format!(
        "bonsai bundle board:{board} version:{version} sha256:{}",
        bundle::sha256_hex(&manifest_bytes)
    );
    let signature = key
        .sign(&manifest_bytes, &trusted)
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    let bytes = bundle::assemble(&manifest_bytes, signature.as_bytes(), &payload);
    Ok(Signed {
        manifest,
        manifest_bytes,
        signature,
        bytes,
        slot_bytes: parts.iter().map(|(_, d)| d.len() as u64).sum(),
    })
}

/// Writes the bundle, its manifest and the manifest's signature into `stage` (a release being
/// assembled); returns their names.
pub fn write_bundle(
    stage: &Path,
    board: &str,
    version: &str,
    build_out: &Path,
    info: &BuildInfo,
    key: &bundle::SecretKey,
) -> Result<Vec<String>> {
    let files = crate::image::SlotFiles::read(build_out, info)?;
    let b = make_bundle(board, version, &files, key)?;
    let names = bundle_names(board, version);
    fs::write(stage.join(&names[0]), &b.bytes)?;
    fs::write(stage.join(&names[1]), &b.manifest_bytes)?;
    fs::write(stage.join(&names[2]), b.signature.as_bytes())?;
    let payload = b.manifest.payload_len();
    ui::detail(format!(
        "bundle: {} chunks, payload {} of {}, index {} ({:.2} % of the payload), key {}",
        b.manifest.chunks.len(),
        ui::size(payload),
        ui::size(b.slot_bytes),
        ui::size(b.manifest_bytes.len() as u64),
        100.0 * b.manifest_bytes.len() as f64 / payload.max(1) as f64,
        key.id()
    ));
    Ok(names.to_vec())
}

#[derive(Args, Debug)]
pub struct Delta {
    /// The release a device runs (a release folder with a bundle)
    pub old: PathBuf,
    /// The release it updates to
    pub new: PathBuf,
    /// Print JSON on stdout (schemas/delta.schema.json)
    #[arg(long)]
    pub json: bool,
}

/// What a device on one release fetches to get another.
#[derive(Debug, Clone, Serialize)]
pub struct DeltaReport {
    pub old: String,
    pub new: String,
    /// The whole new bundle.
    pub bundle_bytes: u64,
    /// Header, manifest and signature: fetched whatever the device has.
    pub head_bytes: u64,
    pub chunks: usize,
    pub chunks_fetched: usize,
    /// Payload bytes fetched (chunks the old release lacks).
    pub payload_fetched: u64,
    /// Everything fetched: head plus payload.
    pub fetched_bytes: u64,
    /// `fetched_bytes` as a share of `bundle_bytes`.
    pub fetched_percent: f64,
    /// The manifest as a share of the payload.
    pub index_percent: f64,
    /// Per slot file: (name, size, bytes of its chunks fetched).
    pub files: Vec<FileDelta>,
    /// The other choice, measured on the same pair: the initramfs chunked uncompressed (the
    /// cpio, same chunking), each new chunk compressed with zstd -19 on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpio_alternative: Option<CpioAlternative>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpioAlternative {
    pub cpio_bytes: u64,
    pub chunks: usize,
    pub chunks_fetched: usize,
    /// New chunks' bytes before and after compressing each with zstd -19.
    pub fetched_raw: u64,
    pub fetched_compressed: u64,
    /// What the compressed initramfs costs in this delta (its new chunks' bytes).
    pub initramfs_fetched: u64,
}

/// The initramfs of a release folder, uncompressed (gzip only; `None` for other compressions).
fn release_cpio(dir: &Path) -> Option<Vec<u8>> {
    let gz = fs::read(dir.join("initramfs.cpio.gz")).ok()?;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&gz[..])
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn cpio_alternative(old: &Path, new: &Path, initramfs_fetched: u64) -> Option<CpioAlternative> {
    let (a, b) = (release_cpio(old)?, release_cpio(new)?);
    let c = bundle::Chunking::default();
    let have: std::collections::HashSet<String> = c
        .cut(&a)
        .iter()
        .map(|&(o, l)| bundle::sha256_hex(&a[o..o + l]))
        .collect();
    let mut seen = std::collections::HashSet::new();
    let (mut chunks, mut fetched, mut raw, mut comp) = (0, 0, 0u64, 0u64);
    for (o, l) in c.cut(&b) {
        let bytes = &b[o..o + l];
        let sha = bundle::sha256_hex(bytes);
        if !seen.insert(sha.clone()) {
            continue;
        }
        chunks += 1;
        if !have.contains(&sha) {
            fetched += 1;
            raw += l as u64;
            comp += zstd::bulk::compress(bytes, 19).ok()?.len() as u64;
        }
    }
    Some(CpioAlternative {
        cpio_bytes: b.len() as u64,
        chunks,
        chunks_fetched: fetched,
        fetched_raw: raw,
        fetched_compressed: comp,
        initramfs_fetched,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct FileDelta {
    pub name: String,
    pub size: u64,
    pub fetched: u64,
    pub changed: bool,
}

/// The bundle of a release folder: its path, header and parsed manifest (unverified: the host
/// reads its own releases).
pub fn read_release_bundle(dir: &Path) -> Result<(PathBuf, bundle::Header, bundle::Manifest)> {
    let found = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "bundle"));
    let Some(path) = found else {
        bail!(
            "{}: no .bundle in this release folder (cargo xtask bundle writes one)",
            dir.display()
        );
    };
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let header =
        bundle::Header::parse(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let end = header.payload_offset() as usize;
    if bytes.len() < end {
        bail!("{}: truncated", path.display());
    }
    let m = bundle::Manifest::parse(
        &bytes[bundle::HEADER_LEN as usize..(bundle::HEADER_LEN + header.manifest_len) as usize],
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let want = end as u64 + m.payload_len();
    if bytes.len() as u64 != want {
        bail!(
            "{}: {} bytes, its manifest says {want}",
            path.display(),
            bytes.len()
        );
    }
    Ok((path, header, m))
}

/// The delta from `old` to `new` (release folders).
pub fn delta(old: &Path, new: &Path) -> Result<DeltaReport> {
    let (_, _, om) = read_release_bundle(old)?;
    let (np, nh, nm) = read_release_bundle(new)?;
    let have: std::collections::HashSet<&str> =
        om.chunks.iter().map(|c| c.sha256.as_str()).collect();
    let plan = bundle::Plan::new(&nm, |h| have.contains(h));
    let fetched: std::collections::HashSet<u32> = plan.fetch.iter().copied().collect();
    let files: Vec<FileDelta> = nm
        .files
        .iter()
        .map(|f| {
            // A chunk shared by two files is fetched once: count it for the first file using it.
            let mut seen = std::collections::HashSet::new();
            let bytes = f
                .chunks
                .iter()
                .filter(|i| fetched.contains(i) && seen.insert(**i))
                .map(|i| u64::from(nm.chunks[*i as usize].size))
                .sum();
            FileDelta {
                name: f.name.clone(),
                size: f.size,
                fetched: bytes,
                changed: om
                    .file(&f.name)
                    .map(|o| o.sha256 != f.sha256)
                    .unwrap_or(true),
            }
        })
        .collect();
    let bundle_bytes = fs::metadata(&np)?.len();
    let head = nh.payload_offset();
    let fetched_bytes = head + plan.fetch_bytes;
    let initrd_fetched = files
        .iter()
        .find(|f| f.name == "initrd")
        .map(|f| f.fetched)
        .unwrap_or(0);
    Ok(DeltaReport {
        old: format!("{} {}", om.board, om.version),
        new: format!("{} {}", nm.board, nm.version),
        bundle_bytes,
        head_bytes: head,
        chunks: nm.chunks.len(),
        chunks_fetched: plan.fetch.len(),
        payload_fetched: plan.fetch_bytes,
        fetched_bytes,
        fetched_percent: 100.0 * fetched_bytes as f64 / bundle_bytes.max(1) as f64,
        index_percent: 100.0 * nh.manifest_len as f64 / nm.payload_len().max(1) as f64,
        files,
        cpio_alternative: cpio_alternative(old, new, initrd_fetched),
    })
}

impl Delta {
    pub fn run(self) -> Result<()> {
        let r = delta(&self.old, &self.new)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "{} -> {}: fetch {} of the {} bundle ({:.1} %): {} of {} chunks, plus {} of manifest and signature",
            r.old,
            r.new,
            ui::size(r.fetched_bytes),
            ui::size(r.bundle_bytes),
            r.fetched_percent,
            r.chunks_fetched,
            r.chunks,
            ui::size(r.head_bytes)
        );
        for f in &r.files {
            println!(
                "  {:7} {:>10}  {}, fetch {}",
                f.name,
                ui::size(f.size),
                if f.changed { "changed" } else { "unchanged" },
                ui::size(f.fetched)
            );
        }
        println!("  chunk index: {:.2} % of the payload", r.index_percent);
        if let Some(c) = &r.cpio_alternative {
            println!(
                "  chunking the uncompressed cpio instead: {} of {} chunks new, {} ({} with zstd -19 per chunk), against {} of compressed initramfs chunks",
                c.chunks_fetched,
                c.chunks,
                ui::size(c.fetched_raw),
                ui::size(c.fetched_compressed),
                ui::size(c.initramfs_fetched)
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_release_changes_hello_and_nothing_else() {
        let root = crate::project_root();
        let dest = tempfile::tempdir().unwrap();
        let copy = dest.path().join("next");
        one_package_changed(&root, &copy).unwrap();
        let read = |r: &Path, f: &str| fs::read_to_string(r.join(f)).unwrap();
        let nix = read(&copy, "examples/hello/default.nix");
        assert!(nix.contains("version = \"1.1\";"), "{nix}");
        assert!(
            read(&copy, "examples/hello/src/hello.c").contains("\"hello (bonsai example) 1.1\"")
        );
        // Everything else is byte for byte the original.
        for f in [
            "boards/qemu-x86_64.toml",
            "profiles/minimal.toml",
            "nix/bonsai.nix",
        ] {
            assert_eq!(read(&root, f), read(&copy, f), "{f}");
        }
        let changed =
            |r: &Path| read(r, "examples/hello/default.nix").replace("\"1.0\"", "\"1.1\"");
        assert_eq!(changed(&root), nix);
        // A second call starts afresh rather than bumping again.
        one_package_changed(&root, &copy).unwrap();
        assert_eq!(read(&copy, "examples/hello/default.nix"), nix);
        // A package that no longer has the expected line is an error naming the file.
        let bent = dest.path().join("bent");
        one_package_changed(&root, &bent).unwrap();
        let err = one_package_changed(&bent, &dest.path().join("again"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "examples/hello/default.nix: expected one 'version = \"1.0\";' to change for the next release"
        );
    }
}
