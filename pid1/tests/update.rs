//! `bonsai-update install` on the host, against a folder laid out like the ESP (`--esp`): what
//! it writes for a good bundle, and that every bad one is refused with one line and leaves
//! every byte of the folder as it was. Bundles come from a file and from a small HTTP server
//! here that answers range requests and can cut a response short.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_bonsai-init");

fn pseudo(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Device {
    dir: tempfile::TempDir,
    key: bundle::SecretKey,
}

impl Device {
    /// An ESP with slot `a` running (`release` 1.0, blessed unless `trial`) and slot b empty.
    fn new(trial: bool) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let key = bundle::SecretKey::from_random(&[7; 40]);
        let esp = dir.path().join("esp");
        std::fs::create_dir_all(esp.join("loader/entries")).unwrap();
        std::fs::create_dir_all(esp.join("bonsai/a")).unwrap();
        std::fs::write(esp.join("bonsai/a/linux"), linux_v1()).unwrap();
        std::fs::write(esp.join("bonsai/a/initrd"), initrd_v1()).unwrap();
        let name = if trial {
            "bonsai-a+2-1.conf"
        } else {
            "bonsai-a.conf"
        };
        std::fs::write(
            esp.join("loader/entries").join(name),
            "title bonsai 1.0 (slot a)\nsort-key bonsai\nversion 1-1.0\nlinux /bonsai/a/linux\ninitrd /bonsai/a/initrd\noptions console=ttyS0 bonsai.slot=a panic=-1\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("update.pub"), key.public_file()).unwrap();
        std::fs::write(
            dir.path().join("update.conf"),
            "board=qemu-x86_64\ntries=3\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("slot"), "a\n").unwrap();
        Device { dir, key }
    }

    fn esp(&self) -> PathBuf {
        self.dir.path().join("esp")
    }

    /// Every file under the ESP with its bytes.
    fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if p.is_dir() {
                    out.insert(format!("{rel}/"), Vec::new());
                    walk(base, &p, out);
                } else {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.esp(), &self.esp(), &mut out);
        out
    }

    fn install(&self, source: &str, extra: &[&str]) -> (bool, String) {
        let d = self.dir.path();
        let o = Command::new(BIN)
            .arg("update")
            .arg("install")
            .arg(source)
            .args(["--no-reboot", "--esp"])
            .arg(self.esp())
            .arg("--key")
            .arg(d.join("update.pub"))
            .arg("--conf")
            .arg(d.join("update.conf"))
            .arg("--slot-file")
            .arg(d.join("slot"))
            .args(extra)
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    }

    fn write_bundle(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }
}

fn linux_v1() -> Vec<u8> {
    pseudo(600_000, 1)
}
fn initrd_v1() -> Vec<u8> {
    pseudo(900_000, 2)
}
/// Release 2.0: the kernel as before, one stretch of the initramfs changed (one package).
fn initrd_v2() -> Vec<u8> {
    let mut v = initrd_v1();
    v.splice(400_000..420_000, pseudo(25_000, 3));
    v
}

fn make_bundle(key: &bundle::SecretKey, board: &str, version: &str) -> Vec<u8> {
    let (m, payload) = bundle::Manifest::build(
        board,
        version,
        bundle::Chunking::default(),
        &[("linux", &linux_v1()), ("initrd", &initrd_v2())],
    )
    .unwrap();
    let mb = m.to_bytes();
    let sig = key.sign(&mb, "test").unwrap();
    bundle::assemble(&mb, sig.as_bytes(), &payload)
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(prefix))
}

#[test]
fn a_good_bundle_writes_slot_b_reusing_slot_a_and_arms_it_last() {
    let dev = Device::new(false);
    let b = make_bundle(&dev.key, "qemu-x86_64", "2.0");
    let (ok, out) = dev.install(&dev.write_bundle("u.bundle", &b), &[]);
    assert!(ok, "{out}");
    let esp = dev.esp();
    assert_eq!(
        std::fs::read(esp.join("bonsai/b/linux")).unwrap(),
        linux_v1()
    );
    assert_eq!(
        std::fs::read(esp.join("bonsai/b/initrd")).unwrap(),
        initrd_v2()
    );
    let entry = std::fs::read_to_string(esp.join("loader/entries/bonsai-b+3.conf")).unwrap();
    assert!(entry.contains("version 2-2.0\n"), "{entry}");
    assert!(entry.contains("linux /bonsai/b/linux\n"));
    assert!(
        entry.contains("options console=ttyS0 bonsai.slot=b panic=-1\n"),
        "{entry}"
    );
    // The running slot is untouched.
    assert_eq!(
        std::fs::read(esp.join("bonsai/a/initrd")).unwrap(),
        initrd_v1()
    );
    assert!(esp.join("loader/entries/bonsai-a.conf").exists());
    // Only the changed stretch is fetched: the kernel and most of the initramfs come from a.
    let fetched: u64 = line(&out, "BONSAI-UPDATE-FETCHED ")
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        fetched > 0 && fetched < 25_000 + 4 * 65536,
        "fetched {fetched}: {out}"
    );
    assert!(
        fetched * 10 < b.len() as u64,
        "fetched {fetched} of {}",
        b.len()
    );
}

#[test]
fn every_bad_bundle_is_refused_in_one_line_and_writes_nothing() {
    let dev = Device::new(false);
    let good = make_bundle(&dev.key, "qemu-x86_64", "2.0");
    let other_key = bundle::SecretKey::from_random(&[9; 40]);
    let head_len = {
        let h = bundle::Header::parse(&good).unwrap();
        h.payload_offset() as usize
    };
    // Corrupt a chunk the device lacks (one it has is taken from slot a, not the bundle).
    let m = bundle::Manifest::parse(
        &good[32..32 + bundle::Header::parse(&good).unwrap().manifest_len as usize],
    )
    .unwrap();
    let mut local = bundle::Local::default();
    local.add("a/linux", linux_v1(), &m.chunking);
    local.add("a/initrd", initrd_v1(), &m.chunking);
    let fresh = m
        .chunks
        .iter()
        .find(|c| local.get(&c.sha256).is_none())
        .unwrap();
    let mut corrupt = good.clone();
    corrupt[head_len + fresh.offset as usize + 5] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "wrong-signature",
            make_bundle(&other_key, "qemu-x86_64", "2.0"),
            "signature",
        ),
        (
            "other-board",
            make_bundle(&dev.key, "raspberrypi3", "2.0"),
            "board raspberrypi3",
        ),
        (
            "older",
            make_bundle(&dev.key, "qemu-x86_64", "0.9"),
            "not newer",
        ),
        (
            "same",
            make_bundle(&dev.key, "qemu-x86_64", "1.0"),
            "not newer",
        ),
        ("corrupt-chunk", corrupt, "does not match its sha256"),
        ("truncated", good[..good.len() - 1000].to_vec(), "truncated"),
        (
            "truncated-head",
            good[..head_len - 10].to_vec(),
            "truncated",
        ),
        ("not-a-bundle", b"hello".to_vec(), "not a bonsai bundle"),
    ];
    let before = dev.snapshot();
    for (name, bytes, why) in cases {
        let (ok, out) = dev.install(&dev.write_bundle(&format!("{name}.bundle"), &bytes), &[]);
        assert!(!ok, "{name} was installed: {out}");
        let refused: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("bonsai-update: refused: "))
            .collect();
        assert_eq!(refused.len(), 1, "{name}: {out}");
        assert!(refused[0].contains(why), "{name}: {out}");
        assert!(
            !out.contains("BONSAI-UPDATE-PHASE"),
            "{name} started writing: {out}"
        );
        assert_eq!(dev.snapshot(), before, "{name} changed the ESP");
    }
    // A downgrade goes in only when asked for.
    let old = dev.write_bundle("older.bundle", &make_bundle(&dev.key, "qemu-x86_64", "0.9"));
    let (ok, out) = dev.install(&old, &["--allow-downgrade"]);
    assert!(ok, "{out}");
    assert!(out.contains("BONSAI-UPDATE-DOWNGRADE"));
}

#[test]
fn no_install_while_the_running_slot_is_on_trial() {
    let dev = Device::new(true);
    let before = dev.snapshot();
    let b = make_bundle(&dev.key, "qemu-x86_64", "2.0");
    let (ok, out) = dev.install(&dev.write_bundle("u.bundle", &b), &[]);
    assert!(!ok);
    assert!(out.contains("still on trial"), "{out}");
    assert_eq!(dev.snapshot(), before);
}

/// Serves `bytes` with range requests; the first `cuts` responses stop after `cut_after`
/// bytes of body. Counts the body bytes sent.
fn serve(bytes: Vec<u8>, cuts: u64, cut_after: usize) -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for (n, s) in (0u64..).zip(l.incoming()) {
            let mut s = s.unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.trim().strip_prefix("Range: bytes=") {
                    let (a, b) = v.split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                }
            }
            let (a, b) = range.unwrap();
            let b = b.min(bytes.len() - 1);
            let mut body = &bytes[a..=b];
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                body.len(),
                bytes.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            if n < cuts && body.len() > cut_after {
                body = &body[..cut_after];
            }
            let _ = s.write_all(body);
            counter.fetch_add(body.len() as u64, Ordering::SeqCst);
            let mut sink = Vec::new();
            drop(s.shutdown(std::net::Shutdown::Write));
            let _ = r.read_to_end(&mut sink);
        }
    });
    (format!("http://{addr}/qemu-x86_64-2.0.bundle"), sent)
}

#[test]
fn over_http_a_cut_transfer_resumes_without_fetching_verified_chunks_again() {
    // A fresh slot b and a kernel changed too: most of the payload must come over the wire.
    let dev = Device::new(false);
    std::fs::remove_file(dev.esp().join("bonsai/a/linux")).unwrap();
    let b = make_bundle(&dev.key, "qemu-x86_64", "2.0");
    let h = bundle::Header::parse(&b).unwrap();
    // Two responses cut short after 150 000 bytes of body (the head is smaller and whole).
    let (url, sent) = serve(b.clone(), 3, 150_000);
    let (ok, out) = dev.install(&url, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("BONSAI-UPDATE-RESUME payload"), "{out}");
    assert_eq!(
        std::fs::read(dev.esp().join("bonsai/b/linux")).unwrap(),
        linux_v1()
    );
    let plan = line(&out, "BONSAI-UPDATE-PLAN ").unwrap();
    let w: Vec<&str> = plan.split_whitespace().collect();
    let fetch_bytes: u64 = w[7].parse().unwrap();
    // What the server sent: the head, the chunks to fetch, and at most one partial chunk per
    // cut (a chunk is kept only whole and verified; the next request starts at the first one
    // missing).
    let max = bundle::Chunking::default().max as u64;
    let total = sent.load(Ordering::SeqCst);
    assert!(
        total <= h.payload_offset() + fetch_bytes + 3 * max,
        "sent {total}, needed {} + {fetch_bytes}",
        h.payload_offset()
    );
    assert!(total >= h.payload_offset() + fetch_bytes);
}
