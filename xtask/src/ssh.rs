//! SSH into a booted image: the profile's `authorized-keys = "auto"` uses a key pair bonsai
//! keeps in its cache; `boot --ssh` boots headless with a port forwarded on 127.0.0.1, waits
//! for the guest and the port, then runs the host's OpenSSH client.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::Board;
use crate::{host, ui};

/// The cached test key pair, made with ssh-keygen on first use.
pub fn auto_key() -> Result<PathBuf> {
    let dir = crate::cache::cache_dir().join("ssh");
    let key = dir.join("id_ed25519");
    if key.is_file() && dir.join("id_ed25519.pub").is_file() {
        return Ok(key);
    }
    host::ensure(
        &[host::Tool {
            program: "ssh-keygen",
            package: "openssh-client",
        }],
        &[],
    )?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "bonsai-test-key",
            "-f",
        ])
        .arg(&key)
        .status()
        .context("running ssh-keygen")?;
    if !status.success() {
        bail!("ssh-keygen could not make {}", key.display());
    }
    Ok(key)
}

/// The public key text for a profile's `authorized-keys` value, and the private key if bonsai holds it.
pub fn authorized_keys(root: &Path, value: &str) -> Result<(String, Option<PathBuf>)> {
    if value == "auto" {
        let key = auto_key()?;
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .context("reading the cached public key")?;
        return Ok((public, Some(key)));
    }
    let path = if Path::new(value).is_absolute() {
        PathBuf::from(value)
    } else {
        root.join(value)
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("authorized-keys: reading {}", path.display()))?;
    if !text
        .lines()
        .any(|l| l.starts_with("ssh-") || l.starts_with("ecdsa-"))
    {
        bail!("authorized-keys: {} holds no public key", path.display());
    }
    Ok((text, None))
}

pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// Boots the image headless with `bonsai.hold=1`, waits for readiness and the SSH port, then
/// runs `ssh` (interactive when `command` is None). The VM is stopped when ssh ends.
pub fn session(
    board: &Board,
    out: &Path,
    info: &crate::build::BuildInfo,
    key: &Path,
    command: Option<&str>,
) -> Result<String> {
    host::ensure(
        &[host::Tool {
            program: "ssh",
            package: "openssh-client",
        }],
        &[],
    )?;
    let port = free_port()?;
    let mut spec = crate::boot::qemu_spec(board, out, info, Some((port, 22)))?;
    if spec.network.is_none() {
        bail!(
            "boards/{}.toml: qemu.net-device is not set; --ssh needs a network device",
            board.name
        );
    }
    let nonce = qemu::protocol::new_nonce();
    spec.append
        .push_str(&format!(" bonsai.nonce={nonce} bonsai.hold=1"));
    ui::step(format!(
        "boot {} headless, SSH on 127.0.0.1:{port}",
        board.name
    ));
    let log_path = out.join("serial.log");
    let mut child = Command::new(&spec.binary)
        .args(spec.args(qemu::Mode::Headless))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", spec.binary))?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log_for_thread = log_path.clone();
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(&log_for_thread).ok();
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(f) = log.as_mut() {
                let _ = std::io::Write::write_all(f, format!("{line}\n").as_bytes());
            }
            let _ = tx.send(line);
        }
    });
    let result = (|| -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(board.qemu.boot_timeout);
        let ready = format!("{} {nonce}", qemu::protocol::READY);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) if l.trim_start_matches('\r').starts_with(&ready) => break,
                Ok(_) => {}
                Err(_) => bail!(
                    "no ready marker within {} s (serial log: {})",
                    board.qemu.boot_timeout,
                    log_path.display()
                ),
            }
        }
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("port {port} never opened");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut ssh = Command::new("ssh");
        ssh.arg("-i")
            .arg(key)
            .args(["-p", &port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ])
            .args([
                "-o",
                "ConnectTimeout=20",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg("root@127.0.0.1");
        match command {
            Some(c) => {
                ssh.arg(c);
                // Host keys are made on the first connection; give dropbear a few tries.
                let mut last = String::new();
                for _ in 0..5 {
                    let out = ssh.output().context("running ssh")?;
                    if out.status.success() {
                        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
                    }
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    std::thread::sleep(Duration::from_millis(500));
                }
                bail!("ssh root@127.0.0.1 -p {port} failed: {last}")
            }
            None => {
                ssh.status().context("running ssh")?;
                Ok(String::new())
            }
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
