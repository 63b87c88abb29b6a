//! `bonsai-update`: installs a signed bundle into the slot that is not running, the same on
//! every init backend (it is this binary, present in every image that has an update key).
//!
//! `bonsai-update install <file|http://host[:port]/path> [--allow-downgrade] [--no-reboot]`
//!
//! 1. Checks, before anything is written: the manifest's signature against the image's key
//!    (`/etc/bonsai/update.pub`), the board (`/etc/bonsai/update.conf`), that the version is
//!    newer than the running slot's, and that the running slot is blessed (installing during a
//!    trial would overwrite the fallback).
//! 2. Reuses every chunk the device has in either slot's files and fetches the rest with HTTP
//!    range requests, merged into runs; a cut transfer resumes from the first chunk it lacks,
//!    and chunks already verified are never fetched again. Every chunk is checked against its
//!    hash as it arrives, every file against its own when assembled: all in memory, before the
//!    boot partition is mounted writable.
//! 3. Writes the inactive slot: first removes its entry (a half-written slot is never booted),
//!    then writes and fsyncs its files, then writes the new entry under a name the boot loader
//!    ignores, fsyncs it, and renames it to `bonsai-<slot>+<tries>.conf`: the one atomic step
//!    that arms the trial boot. Then it reboots (`reboot -f` after a sync).
//!
//! Progress and results are raw lines for the host on stdout (`BONSAI-UPDATE-*`); a refusal
//! is one line on stderr, `bonsai-update: refused: <why>`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bundle::{Manifest, Plan, PublicKey, Store, Verified};

const KEY: &str = "/etc/bonsai/update.pub";
const CONF: &str = "/etc/bonsai/update.conf";
const SLOT: &str = "/run/bonsai/slot";
const ESP_MOUNT: &str = "/run/bonsai/update-esp";
const ENTRIES: &str = "loader/entries";
/// Attempts per fetched range before the install gives up (each resumes where the last cut).
const ATTEMPTS: u32 = 8;

type Result<T> = std::result::Result<T, String>;

/// What `install` was asked to do.
#[derive(Debug, Default)]
struct Options {
    source: String,
    allow_downgrade: bool,
    reboot: bool,
    /// A folder holding the ESP's files instead of the partition (tests on the host).
    esp: Option<PathBuf>,
    key: PathBuf,
    conf: PathBuf,
    slot_file: PathBuf,
}

pub fn usage() -> i32 {
    eprintln!(
        "usage: bonsai-update install <file|http://host[:port]/path> [--allow-downgrade] [--no-reboot]\n\
         \x20      bonsai-update status"
    );
    2
}

/// `bonsai-update <args>`; exit codes: 0 done, 1 refused or failed, 2 usage.
pub fn main(args: &[String]) -> i32 {
    let mut it = args.iter();
    let cmd = it.next().map(String::as_str);
    let mut o = Options {
        reboot: true,
        key: PathBuf::from(KEY),
        conf: PathBuf::from(CONF),
        slot_file: PathBuf::from(SLOT),
        ..Options::default()
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Option<PathBuf> {
            let v = it.next().map(PathBuf::from);
            if v.is_none() {
                eprintln!("bonsai-update: {name} needs a value");
            }
            v
        };
        match a.as_str() {
            "--allow-downgrade" => o.allow_downgrade = true,
            "--no-reboot" => o.reboot = false,
            "--esp" => match value("--esp") {
                Some(v) => o.esp = Some(v),
                None => return 2,
            },
            "--key" => match value("--key") {
                Some(v) => o.key = v,
                None => return 2,
            },
            "--conf" => match value("--conf") {
                Some(v) => o.conf = v,
                None => return 2,
            },
            "--slot-file" => match value("--slot-file") {
                Some(v) => o.slot_file = v,
                None => return 2,
            },
            s if s.starts_with("--") => {
                eprintln!("bonsai-update: unknown option {s}");
                return usage();
            }
            s if o.source.is_empty() => o.source = s.to_string(),
            s => {
                eprintln!("bonsai-update: unexpected argument {s}");
                return usage();
            }
        }
    }
    let result = match cmd {
        Some("install") if !o.source.is_empty() => install(&o),
        Some("status") => status(&o),
        _ => return usage(),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            // One line: the reason, for the person at the console and for the host.
            eprintln!("bonsai-update: refused: {e}");
            1
        }
    }
}

/// A progress line on stdout (the harness sends it to the console, where the host reads it).
fn say(line: &str) {
    println!("{line}");
}

/// The image's update settings: `board=` and `tries=`.
struct Conf {
    board: String,
    tries: u32,
}

fn read_conf(path: &Path) -> Result<Conf> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut board = None;
    let mut tries = 3;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("board", v)) => board = Some(v.trim().to_string()),
            Some(("tries", v)) => {
                tries = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{}: tries={v} is not a number", path.display()))?
            }
            _ => {}
        }
    }
    let board = board.ok_or_else(|| format!("{}: no board=", path.display()))?;
    Ok(Conf { board, tries })
}

/// An entry of a slot on the ESP.
#[derive(Debug, Clone)]
struct Entry {
    file: String,
    slot: String,
    blessed: bool,
    generation: u64,
    version: String,
    text: String,
}

fn read_entries(esp: &Path) -> Result<Vec<Entry>> {
    let dir = esp.join(ENTRIES);
    let mut out = Vec::new();
    let list = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in list.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".conf") else {
            continue;
        };
        let Some(rest) = stem.strip_prefix("bonsai-") else {
            continue;
        };
        let (slot, blessed) = match rest.split_once('+') {
            Some((s, _)) => (s.to_string(), false),
            None => (rest.to_string(), true),
        };
        let text = fs::read_to_string(e.path()).map_err(|err| format!("{file}: {err}"))?;
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("version "))
            .unwrap_or("0-");
        let (g, rel) = v.split_once('-').unwrap_or(("0", v));
        out.push(Entry {
            file,
            slot,
            blessed,
            generation: g.parse().unwrap_or(0),
            version: rel.to_string(),
            text,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

fn running_slot(path: &Path) -> Result<String> {
    let s = fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (not booted from a disk slot?)", path.display()))?;
    let s = s.trim().to_string();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(format!("{}: {s:?} is not a slot name", path.display()));
    }
    Ok(s)
}

fn other_slot(s: &str) -> &'static str {
    if s == "a" {
        "b"
    } else {
        "a"
    }
}

/// Where the bundle comes from: a file, or an HTTP server that answers range requests.
enum Source {
    File(fs::File),
    Http {
        host: String,
        addr: String,
        path: String,
        /// The whole file's length, from a response's `Content-Range`.
        total: Option<u64>,
    },
}

impl Source {
    fn open(s: &str) -> Result<Source> {
        if let Some(rest) = s.strip_prefix("http://") {
            let (hostport, path) = match rest.find('/') {
                Some(i) => (rest.get(..i).unwrap_or(rest), rest.get(i..).unwrap_or("/")),
                None => (rest, "/"),
            };
            let addr = if hostport.contains(':') {
                hostport.to_string()
            } else {
                format!("{hostport}:80")
            };
            return Ok(Source::Http {
                host: hostport.to_string(),
                addr,
                path: path.to_string(),
                total: None,
            });
        }
        if s.contains("://") {
            return Err(format!("{s}: only http:// URLs and files are supported"));
        }
        fs::File::open(s)
            .map(Source::File)
            .map_err(|e| format!("{s}: {e}"))
    }

    /// Up to `len` bytes at `offset`: fewer when the transfer was cut or the file ends.
    fn range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        match self {
            Source::File(f) => {
                use std::io::{Seek, SeekFrom};
                f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
                let mut v = Vec::new();
                f.take(len).read_to_end(&mut v).map_err(|e| e.to_string())?;
                Ok(v)
            }
            Source::Http {
                host,
                addr,
                path,
                total,
            } => {
                let (body, t) = http_range(host, addr, path, offset, len)?;
                if t.is_some() {
                    *total = t;
                }
                Ok(body)
            }
        }
    }

    /// The bundle's length as the file system or the server reports it.
    fn total_len(&self) -> Option<u64> {
        match self {
            Source::File(f) => f.metadata().ok().map(|m| m.len()),
            Source::Http { total, .. } => *total,
        }
    }
}

/// One `GET` with `Range: bytes=offset-(offset+len-1)`; returns the body as far as it came,
/// and the file's whole length when the server said it.
fn http_range(
    host: &str,
    addr: &str,
    path: &str,
    offset: u64,
    len: u64,
) -> Result<(Vec<u8>, Option<u64>)> {
    if len == 0 {
        return Ok((Vec::new(), None));
    }
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes={}-{}\r\nConnection: close\r\nUser-Agent: bonsai-update\r\n\r\n",
        offset,
        offset + len - 1
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{addr}: sending the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    // Read the head.
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return Err(format!("{addr}: the connection closed before a response"))
            }
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
        if buf.len() > 65536 {
            return Err(format!("{addr}: response head too long"));
        }
    };
    let head = String::from_utf8_lossy(buf.get(..head_end).unwrap_or_default()).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u32>().ok())
        .unwrap_or(0);
    let mut body = buf.get(head_end..).unwrap_or_default().to_vec();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let total = match status {
        206 => header("content-range")
            .and_then(|v| v.rsplit_once('/').and_then(|(_, t)| t.parse().ok())),
        200 => header("content-length").and_then(|v| v.parse().ok()),
        _ => None,
    };
    let skip = match status {
        206 => 0,
        // A server without ranges sends the whole file: keep the part asked for.
        200 => offset,
        416 => return Ok((Vec::new(), total)),
        _ => {
            let line = head.lines().next().unwrap_or("");
            return Err(format!("http://{host}{path}: {line}"));
        }
    };
    let want = skip + len;
    while (body.len() as u64) < want {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let start = usize::try_from(skip).unwrap_or(usize::MAX).min(body.len());
    let end = usize::try_from(want).unwrap_or(usize::MAX).min(body.len());
    Ok((body.get(start..end).unwrap_or_default().to_vec(), total))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads `len` bytes at `offset`, resuming after cuts.
fn fetch_exact(src: &mut Source, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let mut got: Vec<u8> = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let have = got.len() as u64;
        let more = src.range(offset + have, len - have)?;
        got.extend_from_slice(&more);
        if got.len() as u64 >= len {
            return Ok(got);
        }
        // A file does not grow: what is missing stays missing.
        if matches!(src, Source::File(_)) {
            break;
        }
        say(&format!(
            "BONSAI-UPDATE-RESUME {what} {} of {len} bytes, attempt {attempt}",
            got.len()
        ));
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "bundle is truncated: {what} ends at {} of {len} bytes",
        got.len()
    ))
}

/// The ESP: a given folder, or the partition named `esp` mounted at [`ESP_MOUNT`].
struct Esp {
    dir: PathBuf,
    mounted: bool,
    dev: Option<String>,
}

fn find_esp_device() -> Option<String> {
    for e in fs::read_dir("/sys/class/block").ok()?.flatten() {
        let u = fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        if u.lines().any(|l| l == "PARTNAME=esp") {
            return u
                .lines()
                .find_map(|l| l.strip_prefix("DEVNAME="))
                .map(|d| format!("/dev/{d}"));
        }
    }
    None
}

impl Esp {
    fn open(o: &Options) -> Result<Esp> {
        if let Some(d) = &o.esp {
            return Ok(Esp {
                dir: d.clone(),
                mounted: false,
                dev: None,
            });
        }
        let dev = find_esp_device().ok_or("no partition named esp (not booted from a disk?)")?;
        let _ = fs::create_dir_all(ESP_MOUNT);
        mount(&dev, true)?;
        Ok(Esp {
            dir: PathBuf::from(ESP_MOUNT),
            mounted: true,
            dev: Some(dev),
        })
    }

    /// Writable from now on (a no-op for a folder).
    fn writable(&mut self) -> Result<()> {
        if self.mounted {
            let _ = nix::mount::umount(ESP_MOUNT);
            if let Some(dev) = &self.dev {
                mount(dev, false)?;
            }
        }
        Ok(())
    }
}

impl Drop for Esp {
    fn drop(&mut self) {
        if self.mounted {
            nix::unistd::sync();
            let _ = nix::mount::umount(ESP_MOUNT);
        }
    }
}

fn mount(dev: &str, read_only: bool) -> Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(dev), ESP_MOUNT, Some("vfat"), flags, None::<&str>)
        .map_err(|e| format!("mounting {dev} on {ESP_MOUNT}: {e}"))
}

fn status(o: &Options) -> Result<()> {
    let slot = running_slot(&o.slot_file)?;
    let esp = Esp::open(o)?;
    for e in read_entries(&esp.dir)? {
        say(&format!(
            "BONSAI-UPDATE-STATUS slot {} {} generation {} version {}{}",
            e.slot,
            if e.blessed { "blessed" } else { "counted" },
            e.generation,
            e.version,
            if e.slot == slot { " (running)" } else { "" }
        ));
    }
    Ok(())
}

fn install(o: &Options) -> Result<()> {
    let key_text = fs::read_to_string(&o.key).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let key = PublicKey::parse(&key_text).map_err(|e| format!("{}: {e}", o.key.display()))?;
    let conf = read_conf(&o.conf)?;
    let slot = running_slot(&o.slot_file)?;
    let target = other_slot(&slot);
    let mut src = Source::open(&o.source)?;

    // 1. The head: header, manifest, signature.
    let first = match fetch_exact(&mut src, 0, bundle::HEADER_LEN, "header") {
        Ok(v) => v,
        Err(e) => {
            let peek = src.range(0, 16).unwrap_or_default();
            if !bundle::MAGIC.starts_with(&peek) || peek.is_empty() {
                return Err("not a bonsai bundle (no BONSAI-BUNDLE-1 header)".into());
            }
            return Err(e);
        }
    };
    let header = bundle::Header::parse(&first).map_err(|e| e.to_string())?;
    let mut head = first;
    let rest = header.payload_offset() - bundle::HEADER_LEN;
    head.extend(fetch_exact(&mut src, bundle::HEADER_LEN, rest, "manifest")?);
    let Verified {
        manifest: m,
        header,
    } = bundle::verify_head(&head, &key).map_err(|e| e.to_string())?;
    let whole = header.payload_offset() + m.payload_len();
    match src.total_len() {
        Some(n) if n < whole => {
            return Err(format!(
                "bundle is truncated: {n} bytes, its manifest says {whole}"
            ))
        }
        Some(n) if n > whole => {
            return Err(format!(
                "bundle has {} bytes after its payload ({n}, its manifest says {whole})",
                n - whole
            ))
        }
        _ => {}
    }
    if m.board != conf.board {
        return Err(format!(
            "bundle is for board {}, this device is {}",
            m.board, conf.board
        ));
    }
    let mut esp = Esp::open(o)?;
    let entries = read_entries(&esp.dir)?;
    let own = entries
        .iter()
        .find(|e| e.slot == slot)
        .ok_or_else(|| format!("no entry of the running slot {slot} on the boot partition"))?;
    if !own.blessed {
        return Err(format!(
            "the running slot {slot} is still on trial ({}): installing now would overwrite its fallback",
            own.file
        ));
    }
    match bundle::compare_versions(&m.version, &own.version) {
        std::cmp::Ordering::Greater => {}
        _ if o.allow_downgrade => say(&format!(
            "BONSAI-UPDATE-DOWNGRADE from {} to {} (--allow-downgrade)",
            own.version, m.version
        )),
        _ => {
            return Err(format!(
                "version {} is not newer than the running {} (--allow-downgrade installs it)",
                m.version, own.version
            ))
        }
    }
    let generation = entries.iter().map(|e| e.generation).max().unwrap_or(0) + 1;
    say(&format!(
        "BONSAI-UPDATE-VERIFIED board {} version {} into slot {target} (running {slot} {})",
        m.board, m.version, own.version
    ));

    // 2. Chunks: from both slots' files, then fetched.
    let mut local = bundle::Local::default();
    for s in ["a", "b"] {
        for f in bundle::FILE_NAMES {
            if let Ok(data) = fs::read(esp.dir.join("bonsai").join(s).join(f)) {
                local.add(&format!("{s}/{f}"), data, &m.chunking);
            }
        }
    }
    let plan = Plan::new(&m, |h| local.get(h).is_some());
    let mut store = Store::default();
    for &i in &plan.reuse {
        let sha = m
            .chunks
            .get(i as usize)
            .map(|c| c.sha256.as_str())
            .unwrap_or("");
        if let Some(bytes) = local.get(sha) {
            store.put(&m, i, bytes).map_err(|e| e.to_string())?;
        }
    }
    say(&format!(
        "BONSAI-UPDATE-PLAN chunks {} reuse {} {} fetch {} {}",
        m.chunks.len(),
        plan.reuse.len(),
        plan.reuse_bytes,
        plan.fetch.len(),
        plan.fetch_bytes
    ));
    let fetched = fetch_missing(&mut src, &m, header.payload_offset(), &mut store)?;
    let mut files = Vec::new();
    for f in &m.files {
        files.push((
            f.name.clone(),
            store.file(&m, &f.name).map_err(|e| e.to_string())?,
        ));
    }
    say(&format!(
        "BONSAI-UPDATE-FETCHED {} payload {fetched} head {}",
        fetched + header.payload_offset(),
        header.payload_offset()
    ));

    // 3. Write the inactive slot; arm it last.
    esp.writable()?;
    write_slot(
        &esp.dir, target, &files, &entries, own, &m, generation, conf.tries,
    )?;
    say(&format!(
        "BONSAI-UPDATE-ARMED slot {target} generation {generation} version {} tries {}",
        m.version, conf.tries
    ));
    drop(esp);
    if o.reboot {
        say("bonsai-update: rebooting into the trial");
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        return Err("reboot failed".into());
    }
    Ok(())
}

/// Fetches every chunk the store lacks, in merged ranges, resuming after cuts; returns the
/// payload bytes fetched.
fn fetch_missing(src: &mut Source, m: &Manifest, base: u64, store: &mut Store) -> Result<u64> {
    let mut fetched = 0u64;
    let mut attempt = 0;
    loop {
        let missing: Vec<u32> = (0..m.chunks.len() as u32)
            .filter(|i| !store.has(*i))
            .collect();
        if missing.is_empty() {
            return Ok(fetched);
        }
        let plan = Plan {
            fetch: missing,
            reuse: Vec::new(),
            fetch_bytes: 0,
            reuse_bytes: 0,
        };
        let mut cut = false;
        for (off, len) in plan.ranges(m) {
            let bytes = src.range(base + off, len)?;
            fetched += bytes.len() as u64;
            store
                .put_range(m, off, &bytes)
                .map_err(|e| format!("refusing the bundle: {e}"))?;
            if (bytes.len() as u64) < len {
                cut = true;
                break;
            }
        }
        if cut {
            attempt += 1;
            let left = (0..m.chunks.len() as u32)
                .filter(|i| !store.has(*i))
                .count();
            if attempt >= ATTEMPTS || matches!(src, Source::File(_)) {
                return Err(format!(
                    "bundle is truncated: {left} chunks missing after {attempt} attempts"
                ));
            }
            say(&format!(
                "BONSAI-UPDATE-RESUME payload {left} chunks left, {} of {} chunks verified, attempt {attempt}",
                store.len(),
                m.chunks.len()
            ));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn fsync_path(p: &Path) -> Result<()> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", p.display()))
}

fn write_file(p: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", p.display()))
}

/// The new entry's text: the running entry's with the target's files, version and slot.
fn entry_text(own: &Entry, target: &str, m: &Manifest, generation: u64, dtb: bool) -> String {
    let dir = format!("/bonsai/{target}");
    let options = own
        .text
        .lines()
        .find_map(|l| l.strip_prefix("options "))
        .unwrap_or("")
        .split_whitespace()
        .map(|w| {
            if w.starts_with("bonsai.slot=") {
                format!("bonsai.slot={target}")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut t = format!(
        "title bonsai {} (slot {target})\nsort-key bonsai\nversion {generation}-{}\nlinux {dir}/linux\ninitrd {dir}/initrd\n",
        m.version, m.version
    );
    if dtb {
        t.push_str(&format!("devicetree {dir}/dtb\n"));
    }
    t.push_str(&format!("options {options}\n"));
    t
}

#[allow(clippy::too_many_arguments)]
fn write_slot(
    esp: &Path,
    target: &str,
    files: &[(String, Vec<u8>)],
    entries: &[Entry],
    own: &Entry,
    m: &Manifest,
    generation: u64,
    tries: u32,
) -> Result<()> {
    let edir = esp.join(ENTRIES);
    // The target's entry goes first: from here until the new entry is renamed into place the
    // slot is not bootable, so no half-written file is ever booted.
    for e in entries.iter().filter(|e| e.slot == target) {
        let p = edir.join(&e.file);
        fs::remove_file(&p).map_err(|err| format!("removing {}: {err}", p.display()))?;
    }
    fsync_path(&edir)?;
    say(&format!("BONSAI-UPDATE-PHASE write slot {target}"));
    let sdir = esp.join("bonsai").join(target);
    fs::create_dir_all(&sdir).map_err(|e| format!("{}: {e}", sdir.display()))?;
    for (name, data) in files {
        write_file(&sdir.join(name), data)?;
    }
    let has_dtb = files.iter().any(|(n, _)| n == "dtb");
    if !has_dtb {
        let _ = fs::remove_file(sdir.join("dtb"));
    }
    fsync_path(&sdir)?;
    nix::unistd::sync();
    say(&format!("BONSAI-UPDATE-PHASE arm slot {target}"));
    let tmp = edir.join(format!("bonsai-{target}.new"));
    write_file(
        &tmp,
        entry_text(own, target, m, generation, has_dtb).as_bytes(),
    )?;
    // The new file's directory entry (its size and first cluster) on the disk before the
    // rename copies it.
    fsync_path(&edir)?;
    nix::unistd::sync();
    let armed = edir.join(format!("bonsai-{target}+{tries}.conf"));
    fs::rename(&tmp, &armed).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    fsync_path(&edir)?;
    nix::unistd::sync();
    Ok(())
}
