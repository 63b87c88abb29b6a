//! `bonsai-init devices`: the device rules (`[[device-rules]]`, rendered to
//! `/etc/bonsai/devices.json`) applied natively, as the shell backends apply them with busybox
//! `uevent` and mdev (rootfs' `devices` module describes both, and the state they share).
//!
//! It opens the kernel's uevent netlink socket, waits until it hears its own settle barrier (a
//! `change` for /dev/null's device), writes `add` to every `uevent` file under /sys/devices
//! (coldplug), handles events until the barrier comes back, and then forks: the parent exits
//! (the boot goes on to the mounts), the child goes on handling events (hotplug) until the
//! machine stops.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use serde::Deserialize;

pub const CONFIG: &str = "/etc/bonsai/devices.json";
const STATE_DIR: &str = "/run/bonsai/dev";
const BARRIER_DEVPATH: &str = "/devices/virtual/mem/null";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Devices {
    pub rules: Vec<Rule>,
    pub modprobe: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Rule {
    pub subsystem: Option<String>,
    pub kernel: Option<String>,
    pub devtype: Option<String>,
    pub attrs: Vec<(String, String)>,
    pub modalias: Option<String>,
    pub node: Option<NodeAccess>,
    pub symlinks: Vec<String>,
    pub load_module: Option<String>,
    pub run_add: Option<String>,
    pub run_remove: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct NodeAccess {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// One uevent: its variables (`ACTION`, `DEVPATH`, `SUBSYSTEM`, …).
pub type Event = BTreeMap<String, String>;

/// Parses a kernel uevent message (`add@/devices/…\0ACTION=add\0…`); `None` for anything
/// else (libudev's own messages, which start with `libudev`).
pub fn parse_message(msg: &[u8]) -> Option<Event> {
    let mut parts = msg.split(|b| *b == 0);
    let head = parts.next()?;
    if !head.contains(&b'@') || head.starts_with(b"libudev") {
        return None;
    }
    let mut ev = Event::new();
    for p in parts {
        let p = String::from_utf8_lossy(p);
        if let Some((k, v)) = p.split_once('=') {
            ev.insert(k.to_string(), v.to_string());
        }
    }
    (ev.contains_key("ACTION") && ev.contains_key("DEVPATH")).then_some(ev)
}

/// Whether `name` matches `glob` (`*` any run, `?` one character), as rootfs renders for mdev.
pub fn glob_match(glob: &str, name: &str) -> bool {
    fn go(g: &[char], n: &[char]) -> bool {
        match g.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| n.get(i..).is_some_and(|t| go(rest, t))),
            Some(('?', rest)) => n.get(1..).is_some_and(|t| go(rest, t)),
            Some((c, rest)) => n.first() == Some(c) && n.get(1..).is_some_and(|t| go(rest, t)),
        }
    }
    let g: Vec<char> = glob.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&g, &n)
}

/// The label of the ext2/3/4 or FAT filesystem in `head` (a device's first 2 KiB), with
/// characters other than letters, digits, `.`, `_` and `-` as `_`.
pub fn fs_label(head: &[u8]) -> Option<String> {
    let field = |from: usize, len: usize| -> Vec<u8> {
        head.get(from..from + len)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|b| *b != 0)
            .collect()
    };
    let raw = if head.get(1080..1082) == Some(&[0x53, 0xef]) {
        field(1144, 16)
    } else if field(82, 5) == b"FAT32" {
        field(71, 11)
    } else if field(54, 3) == b"FAT" {
        field(43, 11)
    } else {
        return None;
    };
    let text = String::from_utf8_lossy(&raw);
    let text = text.trim_end_matches(' ');
    if text.is_empty() || text == "NO NAME" {
        return None;
    }
    Some(
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect(),
    )
}

/// Applies rules to events. `root` is `/` on a device (another folder in tests).
pub struct Handler {
    pub devices: Devices,
    pub root: PathBuf,
}

impl Handler {
    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn state_file(&self, rule: usize, devpath: &str) -> PathBuf {
        self.path(STATE_DIR)
            .join(format!("{rule}@{}", devpath.replace('/', "!")))
    }

    fn matches(r: &Rule, ev: &Event, kernel: &str) -> bool {
        let exact = |want: &Option<String>, key: &str| {
            want.as_ref()
                .is_none_or(|w| ev.get(key).is_some_and(|v| v == w))
        };
        exact(&r.subsystem, "SUBSYSTEM")
            && exact(&r.devtype, "DEVTYPE")
            && r.kernel.as_ref().is_none_or(|g| glob_match(g, kernel))
            && r.modalias
                .as_ref()
                .is_none_or(|g| ev.get("MODALIAS").is_some_and(|m| glob_match(g, m)))
    }

    /// Handles one event; `true` when it was the settle barrier.
    pub fn handle(&self, ev: &Event) -> bool {
        let action = ev.get("ACTION").map(String::as_str).unwrap_or_default();
        let devpath = ev.get("DEVPATH").map(String::as_str).unwrap_or_default();
        if action == "change" && devpath == BARRIER_DEVPATH {
            let _ = std::fs::write(self.path(STATE_DIR).join("settled"), b"");
            return true;
        }
        let kernel = devpath.rsplit('/').next().unwrap_or_default();
        let devname = ev.get("DEVNAME").filter(|d| !d.is_empty());
        for (i, r) in self.devices.rules.iter().enumerate() {
            if !Self::matches(r, ev, kernel) {
                continue;
            }
            let state = self.state_file(i, devpath);
            if action == "remove" {
                let Ok(made) = std::fs::read_to_string(&state) else {
                    continue;
                };
                self.unlink_all(&made);
                let _ = std::fs::remove_file(&state);
                if let Some(c) = &r.run_remove {
                    self.run_shell(c, ev);
                }
                continue;
            }
            if action != "add" && action != "change" {
                continue;
            }
            let attrs_match = r.attrs.iter().all(|(a, want)| {
                std::fs::read_to_string(self.path(&format!("/sys{devpath}/{a}")))
                    .is_ok_and(|v| v.trim_end_matches('\n') == want)
            });
            if !attrs_match {
                continue;
            }
            let first = !state.exists();
            let node = devname.map(|d| self.path(&format!("/dev/{d}")));
            if let (Some(n), Some(node)) = (&r.node, &node) {
                if node.exists() {
                    let _ = nix::unistd::chown(
                        node,
                        Some(nix::unistd::Uid::from_raw(n.uid)),
                        Some(nix::unistd::Gid::from_raw(n.gid)),
                    );
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(node, std::fs::Permissions::from_mode(n.mode));
                }
            }
            if let Ok(made) = std::fs::read_to_string(&state) {
                self.unlink_all(&made);
            }
            let mut made = String::new();
            if let (Some(d), false) = (devname, r.symlinks.is_empty()) {
                let label = if r.symlinks.iter().any(|l| l.contains("{label}")) {
                    self.read_head(d).as_deref().and_then(fs_label)
                } else {
                    None
                };
                for l in &r.symlinks {
                    if l.contains("{label}") && label.is_none() {
                        continue;
                    }
                    let name = l
                        .replace("{kernel}", kernel)
                        .replace("{label}", label.as_deref().unwrap_or_default());
                    let link = format!("/dev/{name}");
                    let at = self.path(&link);
                    if let Some(parent) = at.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    let target = format!("{}{d}", "../".repeat(l.matches('/').count()));
                    let _ = std::fs::remove_file(&at);
                    if symlink(&target, &at).is_ok() {
                        made.push_str(&link);
                        made.push('\n');
                    }
                }
            }
            let _ = std::fs::write(&state, made);
            if first {
                if let Some(m) = &r.load_module {
                    self.run(Command::new("/bin/modprobe").arg(m), ev);
                }
                if let Some(c) = &r.run_add {
                    self.run_shell(c, ev);
                }
            }
        }
        if action == "add" && self.devices.modprobe {
            if let Some(alias) = ev.get("MODALIAS") {
                self.run(Command::new("/bin/modprobe").args(["-q", alias]), ev);
            }
        }
        false
    }

    fn read_head(&self, devname: &str) -> Option<Vec<u8>> {
        let mut f = std::fs::File::open(self.path(&format!("/dev/{devname}"))).ok()?;
        let mut buf = vec![0u8; 2048];
        let mut got = 0;
        while got < buf.len() {
            match f.read(buf.get_mut(got..)?) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        buf.truncate(got);
        Some(buf)
    }

    fn unlink_all(&self, made: &str) {
        for l in made.lines().filter(|l| !l.is_empty()) {
            let _ = std::fs::remove_file(self.path(l));
        }
    }

    fn run_shell(&self, command: &str, ev: &Event) {
        self.run(Command::new("/bin/sh").args(["-c", command]), ev);
    }

    /// Runs a program with the event's variables, its output on our own (the console).
    fn run(&self, cmd: &mut Command, ev: &Event) {
        cmd.env_clear()
            .env("PATH", "/bin")
            .envs(ev)
            .current_dir(&self.root)
            .stdin(Stdio::null());
        if let Err(e) = cmd.status() {
            println!("bonsai: devices: {:?}: {e}", cmd.get_program());
        }
    }

    /// How many rules matched a device now present (the state files).
    pub fn matched(&self) -> usize {
        std::fs::read_dir(self.path(STATE_DIR))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains('@'))
                    .count()
            })
            .unwrap_or(0)
    }
}

fn open_socket() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    // Coldplug sends hundreds of events at once: room for them while rules run.
    let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
    Ok(fd)
}

/// Receives one event, waiting up to `timeout` (`None`: for ever); `Ok(None)` on a timeout.
fn receive(fd: &OwnedFd, timeout: Option<Duration>) -> io::Result<Option<Event>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut buf = vec![0u8; 16384];
    loop {
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => {
                if let Some(ev) = buf.get(..n).and_then(parse_message) {
                    return Ok(Some(ev));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            // A burst larger than the buffer: some events are lost, say so and go on.
            Err(nix::errno::Errno::ENOBUFS) => println!("bonsai: devices: uevents lost (ENOBUFS)"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Asks for the barrier and handles events until it comes (asking again every 2 s, up to
/// 10 s).
fn settle(h: &Handler, fd: &OwnedFd) -> io::Result<bool> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        std::fs::write(h.path(&format!("/sys{BARRIER_DEVPATH}/uevent")), "change")?;
        let round = Instant::now() + Duration::from_secs(2);
        loop {
            let left = round.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match receive(fd, Some(left))? {
                Some(ev) if h.handle(&ev) => return Ok(true),
                Some(_) => {}
                None => break,
            }
        }
    }
    Ok(false)
}

/// Every `uevent` file under `dir`, parents first, not through symlinks.
fn uevent_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    let mut subdirs = Vec::new();
    for e in entries {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            subdirs.push(e.path());
        } else if t.is_file() && e.file_name() == "uevent" {
            out.push(e.path());
        }
    }
    for d in subdirs {
        uevent_files(&d, out);
    }
}

/// `bonsai-init devices`. Exit codes: 0 coldplug done (the handler runs on in the
/// background), 1 failed.
pub fn main() -> i32 {
    let text = match std::fs::read_to_string(CONFIG) {
        Ok(t) => t,
        Err(e) => {
            println!("bonsai: devices: {CONFIG}: {e}");
            return 1;
        }
    };
    let devices: Devices = match serde_json::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            println!("bonsai: devices: {CONFIG}: {e}");
            return 1;
        }
    };
    let h = Handler {
        devices,
        root: PathBuf::from("/"),
    };
    let _ = std::fs::create_dir_all(STATE_DIR);
    let fd = match open_socket() {
        Ok(fd) => fd,
        Err(e) => {
            println!("bonsai: devices: the uevent netlink socket: {e}");
            return 1;
        }
    };
    let run = || -> io::Result<bool> {
        if !settle(&h, &fd)? {
            return Ok(false);
        }
        let mut files = Vec::new();
        uevent_files(Path::new("/sys/devices"), &mut files);
        for f in files {
            let _ = std::fs::write(f, "add");
        }
        settle(&h, &fd)
    };
    match run() {
        Ok(true) => println!(
            "bonsai: devices: coldplug done, {} rule matches",
            h.matched()
        ),
        Ok(false) => println!("bonsai: devices: the device handler did not settle within 10 s"),
        Err(e) => println!("bonsai: devices: coldplug: {e}"),
    }
    // SAFETY: this process has one thread; the child only goes on with the loop below.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => 0,
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            loop {
                match receive(&fd, None) {
                    Ok(Some(ev)) => {
                        h.handle(&ev);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        println!("bonsai: devices: the uevent socket failed: {e}; hotplug stops");
                        return 1;
                    }
                }
            }
        }
        Err(e) => {
            println!("bonsai: devices: cannot fork the hotplug handler: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pairs: &[(&str, &str)]) -> Event {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn messages_and_globs() {
        let m = b"add@/devices/pci0000:00/0000:00:01.0/virtio0/block/vda\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:01.0/virtio0/block/vda\0SUBSYSTEM=block\0MAJOR=254\0MINOR=0\0DEVNAME=vda\0DEVTYPE=disk\0SEQNUM=812\0";
        let e = parse_message(m).unwrap();
        assert_eq!(e["DEVNAME"], "vda");
        assert_eq!(e["DEVTYPE"], "disk");
        assert_eq!(parse_message(b"libudev\0\xfe\xed"), None);
        assert_eq!(parse_message(b"add@/x\0SUBSYSTEM=block\0"), None);
        assert!(glob_match("vd*", "vda"));
        assert!(glob_match("v?a", "vda"));
        assert!(!glob_match("vd?", "vda1"));
        assert!(glob_match(
            "virtio:d00000003v*",
            "virtio:d00000003v00001AF4"
        ));
    }

    #[test]
    fn labels_from_superblocks() {
        let mut ext = vec![0u8; 2048];
        ext[1080] = 0x53;
        ext[1081] = 0xef;
        ext[1144..1148].copy_from_slice(b"data");
        assert_eq!(fs_label(&ext).as_deref(), Some("data"));
        let mut fat = vec![0u8; 2048];
        fat[82..90].copy_from_slice(b"FAT32   ");
        fat[71..82].copy_from_slice(b"BONSAI DATA");
        assert_eq!(fs_label(&fat).as_deref(), Some("BONSAI_DATA"));
        fat[71..82].copy_from_slice(b"NO NAME    ");
        assert_eq!(fs_label(&fat), None);
        assert_eq!(fs_label(&[0u8; 2048]), None);
    }

    #[test]
    fn add_change_and_remove_apply_a_rule_once_per_device() {
        let root = std::env::temp_dir().join(format!("bonsai-devices-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let sys = root.join("sys/devices/pci/virtio0/block/vda");
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::write(sys.join("size"), "65536\n").unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::create_dir_all(root.join("run/bonsai/dev")).unwrap();
        let mut fat = vec![0u8; 4096];
        fat[82..90].copy_from_slice(b"FAT32   ");
        fat[71..82].copy_from_slice(b"bonsaidata ");
        std::fs::write(root.join("dev/vda"), &fat).unwrap();
        let log = root.join("log");
        let rule = Rule {
            subsystem: Some("block".into()),
            kernel: Some("vd*".into()),
            devtype: Some("disk".into()),
            attrs: vec![("size".into(), "65536".into())],
            modalias: None,
            node: Some(NodeAccess {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                mode: 0o640,
            }),
            symlinks: vec!["disk/by-label/{label}".into(), "hot-{kernel}".into()],
            load_module: None,
            run_add: Some(format!("echo \"$ACTION $DEVNAME\" >>{}", log.display())),
            run_remove: Some(format!("echo \"$ACTION $DEVNAME\" >>{}", log.display())),
        };
        let mut other = rule.clone();
        other.attrs = vec![("size".into(), "1".into())];
        other.symlinks = vec!["never".into()];
        let h = Handler {
            devices: Devices {
                rules: vec![rule, other],
                modprobe: false,
            },
            root: root.clone(),
        };
        let add = ev(&[
            ("ACTION", "add"),
            ("DEVPATH", "/devices/pci/virtio0/block/vda"),
            ("SUBSYSTEM", "block"),
            ("DEVTYPE", "disk"),
            ("DEVNAME", "vda"),
        ]);
        assert!(!h.handle(&add));
        let mut change = add.clone();
        change.insert("ACTION".into(), "change".into());
        h.handle(&change);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("dev/vda"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_link(root.join("dev/disk/by-label/bonsaidata")).unwrap(),
            PathBuf::from("../../vda")
        );
        assert_eq!(
            std::fs::read_link(root.join("dev/hot-vda")).unwrap(),
            PathBuf::from("vda")
        );
        assert!(!root.join("dev/never").exists());
        assert_eq!(h.matched(), 1);
        let mut remove = add.clone();
        remove.insert("ACTION".into(), "remove".into());
        std::fs::remove_dir_all(root.join("sys")).unwrap();
        h.handle(&remove);
        assert!(!root.join("dev/hot-vda").exists());
        assert!(!root.join("dev/disk/by-label/bonsaidata").exists());
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "add vda\nremove vda\n"
        );
        assert_eq!(h.matched(), 0);
        let barrier = ev(&[("ACTION", "change"), ("DEVPATH", BARRIER_DEVPATH)]);
        assert!(h.handle(&barrier));
        assert!(root.join("run/bonsai/dev/settled").exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
