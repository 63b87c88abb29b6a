//! Setup commands that bonsai-init carries out itself instead of spawning a program.
//!
//! bonsai renders the same setup steps for every backend as command lines (`/bin/mkdir -p`,
//! `/bin/sysctl -w`, `/bin/ip link set … up`, `/bin/ip addr add`, `/bin/ip -4|-6 route add`);
//! the shell backends run them with busybox. Under emulation each fork and exec of busybox
//! costs milliseconds, so bonsai-init recognises exactly those forms and applies them with
//! system calls and rtnetlink messages that match what busybox `ip` sends (same flags,
//! protocol `boot`, scope `link` for IPv4 routes without a gateway), so the result is the same on
//! every backend (the conformance suite compares `ip addr` and `ip route` output). Anything
//! else, or any form with other arguments, is left to the program.

use std::fs::DirBuilder;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

/// Carries out `argv` if it is one of the forms above: `None` if it is not (spawn it), else
/// whether it worked.
pub fn run(argv: &[String]) -> Option<io::Result<()>> {
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    Some(match args.as_slice() {
        ["/bin/mkdir", "-p", dirs @ ..] if !dirs.is_empty() => mkdir_p(dirs),
        ["/bin/sysctl", "-w", setting] => {
            let (key, value) = setting.split_once('=')?;
            if key.is_empty() || key.contains('/') {
                return None;
            }
            sysctl(key, value)
        }
        ["/bin/ip", "link", "set", dev, "up"] => link_up(dev),
        ["/bin/ip", "addr", "add", cidr, "dev", dev] => {
            let (addr, prefix) = parse_cidr(cidr)?;
            add_address(dev, addr, prefix)
        }
        ["/bin/ip", family @ ("-4" | "-6"), "route", "add", to, rest @ ..] => {
            let (via, dev) = match rest {
                ["via", gw, "dev", dev] => (Some(gw.parse::<IpAddr>().ok()?), *dev),
                ["dev", dev] => (None, *dev),
                _ => return None,
            };
            let v6 = *family == "-6";
            let dst = if *to == "default" {
                None
            } else {
                Some(parse_cidr(to)?)
            };
            if dst.is_some_and(|(a, _)| a.is_ipv6() != v6) || via.is_some_and(|g| g.is_ipv6() != v6)
            {
                return None;
            }
            add_route(dev, v6, dst, via)
        }
        _ => return None,
    })
}

fn mkdir_p(dirs: &[&str]) -> io::Result<()> {
    // Like mkdir -p: 0777 less the umask, existing folders are fine.
    let mut builder = DirBuilder::new();
    builder.recursive(true).mode(0o777);
    for d in dirs {
        builder
            .create(d)
            .map_err(|e| io::Error::new(e.kind(), format!("{d}: {e}")))?;
    }
    Ok(())
}

fn sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv6() { 128 } else { 32 };
    (prefix <= max).then_some((addr, prefix))
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn family(v6: bool) -> u8 {
    if v6 {
        libc_consts::AF_INET6
    } else {
        libc_consts::AF_INET
    }
}

/// The numbers of linux/netlink.h, linux/rtnetlink.h and linux/if.h used here.
mod libc_consts {
    pub const AF_INET: u8 = 2;
    pub const AF_INET6: u8 = 10;
    pub const AF_UNSPEC: u8 = 0;
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLM_F_REQUEST: u16 = 0x1;
    pub const NLM_F_ACK: u16 = 0x4;
    pub const NLM_F_EXCL: u16 = 0x200;
    pub const NLM_F_CREATE: u16 = 0x400;
    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_NEWADDR: u16 = 20;
    pub const RTM_NEWROUTE: u16 = 24;
    pub const IFA_ADDRESS: u16 = 1;
    pub const IFA_LOCAL: u16 = 2;
    pub const RTA_DST: u16 = 1;
    pub const RTA_OIF: u16 = 4;
    pub const RTA_GATEWAY: u16 = 5;
    pub const RT_TABLE_MAIN: u8 = 254;
    pub const RTPROT_BOOT: u8 = 3;
    pub const RT_SCOPE_UNIVERSE: u8 = 0;
    pub const RT_SCOPE_LINK: u8 = 253;
    pub const RTN_UNICAST: u8 = 1;
    pub const IFF_UP: u32 = 0x1;
}
use libc_consts as k;

fn index_of(dev: &str) -> io::Result<u32> {
    let path = format!("/sys/class/net/{dev}/ifindex");
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| io::Error::other(format!("{path}: not a number"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface {dev}"),
        )),
        Err(e) => Err(e),
    }
}

fn link_up(dev: &str) -> io::Result<()> {
    let index = index_of(dev)?;
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut body = vec![k::AF_UNSPEC, 0, 0, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    body.extend_from_slice(&k::IFF_UP.to_ne_bytes());
    body.extend_from_slice(&k::IFF_UP.to_ne_bytes());
    talk(k::RTM_NEWLINK, 0, &body, &[])
}

fn add_address(dev: &str, addr: IpAddr, prefix: u8) -> io::Result<()> {
    let index = index_of(dev)?;
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    let mut body = vec![family(addr.is_ipv6()), prefix, 0, k::RT_SCOPE_UNIVERSE];
    body.extend_from_slice(&index.to_ne_bytes());
    let bytes = octets(addr);
    talk(
        k::RTM_NEWADDR,
        k::NLM_F_CREATE | k::NLM_F_EXCL,
        &body,
        &[(k::IFA_LOCAL, &bytes), (k::IFA_ADDRESS, &bytes)],
    )
}

fn add_route(
    dev: &str,
    v6: bool,
    dst: Option<(IpAddr, u8)>,
    via: Option<IpAddr>,
) -> io::Result<()> {
    let index = index_of(dev)?;
    // As ip(8) does: an IPv4 route without a gateway is on the link.
    let scope = if via.is_none() && !v6 {
        k::RT_SCOPE_LINK
    } else {
        k::RT_SCOPE_UNIVERSE
    };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![
        family(v6),
        dst.map_or(0, |d| d.1),
        0,
        0,
        k::RT_TABLE_MAIN,
        k::RTPROT_BOOT,
        scope,
        k::RTN_UNICAST,
    ];
    body.extend_from_slice(&0u32.to_ne_bytes());
    let dst_bytes = dst.map(|d| octets(d.0));
    let gw_bytes = via.map(octets);
    let oif = index.to_ne_bytes();
    let mut attrs: Vec<(u16, &[u8])> = Vec::new();
    if let Some(d) = &dst_bytes {
        attrs.push((k::RTA_DST, d));
    }
    if let Some(g) = &gw_bytes {
        attrs.push((k::RTA_GATEWAY, g));
    }
    attrs.push((k::RTA_OIF, &oif));
    talk(
        k::RTM_NEWROUTE,
        k::NLM_F_CREATE | k::NLM_F_EXCL,
        &body,
        &attrs,
    )
}

/// The bytes of one request: header, body, attributes (each padded to 4 bytes).
fn message(ty: u16, flags: u16, body: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let pad = |n: usize| (n + 3) & !3;
    let mut payload = body.to_vec();
    payload.resize(pad(payload.len()), 0);
    for (kind, data) in attrs {
        let len = 4 + data.len();
        payload.extend_from_slice(&(len as u16).to_ne_bytes());
        payload.extend_from_slice(&kind.to_ne_bytes());
        payload.extend_from_slice(data);
        payload.resize(pad(payload.len()), 0);
    }
    // struct nlmsghdr: length, type, flags, sequence number, port id (0: the kernel fills it).
    let total = (16 + payload.len()) as u32;
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&(flags | k::NLM_F_REQUEST | k::NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&payload);
    msg
}

/// Sends one request to the kernel and reads its acknowledgement.
fn talk(ty: u16, flags: u16, body: &[u8], attrs: &[(u16, &[u8])]) -> io::Result<()> {
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let msg = message(ty, flags, body, attrs);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty())?;
    let mut reply = [0u8; 4096];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut reply, MsgFlags::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => r?,
        };
        return ack(reply.get(..n).unwrap_or_default());
    }
}

/// The result an acknowledgement carries: `NLMSG_ERROR` with error 0 is success.
fn ack(reply: &[u8]) -> io::Result<()> {
    let (Some(&[t0, t1]), Some(&[e0, e1, e2, e3])) = (reply.get(4..6), reply.get(16..20)) else {
        return Err(io::Error::other("short netlink reply"));
    };
    let ty = u16::from_ne_bytes([t0, t1]);
    if ty != k::NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "unexpected netlink reply type {ty}"
        )));
    }
    match i32::from_ne_bytes([e0, e1, e2, e3]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split(' ').map(String::from).collect()
    }

    #[test]
    fn only_the_rendered_forms_are_taken() {
        // Forms bonsai does not render are left to the program (None), without side effects.
        for line in [
            "/bin/ip link set eth0 down",
            "/bin/ip addr add 10.0.2.15 dev eth0",
            "/bin/ip addr add 10.0.2.15/33 dev eth0",
            "/bin/ip -4 route add default via fec0::1 dev eth0",
            "/bin/ip -6 route add 10.0.0.0/8 dev eth0",
            "/bin/ip route add default via 10.0.2.2 dev eth0",
            "/bin/ip -4 route add default via 10.0.2.2 metric 5 dev eth0",
            "/bin/sysctl -w novalue",
            "/bin/sysctl -w a/b=1",
            "/bin/mkdir /x",
            "/bin/sh -c true",
        ] {
            assert!(run(&argv(line)).is_none(), "{line}");
        }
    }

    #[test]
    fn mkdir_makes_parents_and_accepts_existing_folders() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        let line = format!("/bin/mkdir -p {} {}", deep.display(), dir.path().display());
        assert!(run(&argv(&line)).unwrap().is_ok());
        assert!(deep.is_dir());
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = run(&argv(&format!("/bin/mkdir -p {}/sub", file.display())))
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("file/sub"), "{err}");
    }

    #[test]
    fn missing_interfaces_are_named() {
        let err = run(&argv("/bin/ip link set nosuchif0 up"))
            .unwrap()
            .unwrap_err();
        assert_eq!(err.to_string(), "no network interface nosuchif0");
    }

    #[test]
    fn messages_are_laid_out_like_rtnetlink_wants() {
        let msg = message(
            k::RTM_NEWADDR,
            k::NLM_F_CREATE,
            &[2, 24, 0, 0, 3, 0, 0, 0],
            &[
                (k::IFA_LOCAL, &[10, 0, 2, 15]),
                (k::IFA_ADDRESS, &[10, 0, 2, 15]),
            ],
        );
        assert_eq!(msg.len(), 16 + 8 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), k::RTM_NEWADDR);
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), 0x405);
        assert_eq!(&msg[24..32], &[8, 0, 2, 0, 10, 0, 2, 15]);
        // A 16-byte IPv6 attribute and an odd-sized body are padded to 4 bytes.
        let msg = message(
            k::RTM_NEWROUTE,
            0,
            &[1, 2, 3],
            &[(k::RTA_GATEWAY, &[0; 16])],
        );
        assert_eq!(msg.len(), 16 + 4 + 20);
        assert_eq!(ack(&[0; 8]).unwrap_err().to_string(), "short netlink reply");
        let mut reply = message(k::NLMSG_ERROR, 0, &[0; 4], &[]);
        assert!(ack(&reply).is_ok());
        reply[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(ack(&reply).unwrap_err().raw_os_error(), Some(17));
    }

    /// The setup lines of a profile with static addresses and routes, as bonsai renders them.
    const NETWORK: &[&str] = &[
        "/bin/ip link set lo up",
        "/bin/ip addr add 10.1.2.3/24 dev lo",
        "/bin/ip addr add fec0::15/64 dev lo",
        "/bin/ip -4 route add default via 10.1.2.1 dev lo",
        "/bin/ip -4 route add 10.9.0.0/16 via 10.1.2.4 dev lo",
        "/bin/ip -4 route add 10.8.0.0/16 dev lo",
        // (A gateway on lo is unreachable for IPv6, with ip(8) too.)
        "/bin/ip -6 route add fec2::/64 dev lo",
    ];

    /// In a new network namespace (this thread only): applies [`NETWORK`] natively or with
    /// the host's ip(8), and returns what `ip` then shows.
    fn configure_in_new_netns(native: bool) -> String {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) (needs root)");
            for line in NETWORK {
                if native {
                    run(&argv(line))
                        .expect("a rendered form")
                        .unwrap_or_else(|e| panic!("{line}: {e}"));
                } else {
                    let args = argv(line);
                    let st = std::process::Command::new("ip")
                        .args(&args[1..])
                        .status()
                        .expect("ip(8) from iproute2");
                    assert!(st.success(), "ip {line}");
                }
            }
            let mut shown = String::new();
            for show in [
                &["-o", "addr", "show", "dev", "lo"][..],
                &["-4", "route", "show", "table", "all"],
                &["-6", "route", "show", "table", "all"],
            ] {
                let out = std::process::Command::new("ip")
                    .args(show)
                    .output()
                    .expect("ip(8)");
                assert!(out.status.success());
                shown.push_str(&String::from_utf8_lossy(&out.stdout));
            }
            shown
        })
        .join()
        .unwrap()
    }

    #[test]
    fn native_network_setup_matches_ip() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (a network namespace per run); run the tests as root, as CI does");
        }
        let native = configure_in_new_netns(true);
        let ip = configure_in_new_netns(false);
        assert!(
            native.contains("10.1.2.3/24") && native.contains("fec2::/64"),
            "{native}"
        );
        assert_eq!(native, ip);
    }
}
