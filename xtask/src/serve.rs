//! `cargo xtask serve <release folder>...`: serves release folders over HTTP/1.1 with range
//! requests, for devices to fetch bundles from. `/<folder name>/<file>` is a file of one of
//! the folders. With `--stdio` it answers one connection on stdin and stdout: what QEMU's
//! `guestfwd=...-cmd:` runs for each connection of a guest whose network is `restrict=on`.
//! `--log` appends one line per response (`<path> <offset> <length> <sent>`); `--cut-first N
//! --cut-after B --cut-from O` stops the first N responses to ranges starting at or after O
//! after B bytes of body, as a link that drops would (the update test's resume scenario).

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct Serve {
    /// Release folders to serve (out/release/<board>-<version>)
    #[arg(required = true)]
    pub folders: Vec<PathBuf>,
    /// TCP port on 127.0.0.1
    #[arg(long, default_value_t = 8000, conflicts_with = "stdio")]
    pub port: u16,
    /// Answer one connection on stdin/stdout (for QEMU's guestfwd cmd:)
    #[arg(long)]
    pub stdio: bool,
    /// Append a line per response to this file
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Cut this many responses short (test)
    #[arg(long, default_value_t = 0)]
    pub cut_first: usize,
    /// ... after this many bytes of body
    #[arg(long, default_value_t = 0)]
    pub cut_after: u64,
    /// ... only responses to ranges from this offset on
    #[arg(long, default_value_t = 0)]
    pub cut_from: u64,
}

impl Serve {
    pub fn run(self) -> Result<()> {
        for f in &self.folders {
            if !f.is_dir() {
                bail!("{}: not a folder", f.display());
            }
        }
        if self.stdio {
            let stdin = std::io::stdin();
            let stdout = std::io::stdout();
            return self.connection(&mut stdin.lock(), &mut stdout.lock());
        }
        let l = TcpListener::bind(("127.0.0.1", self.port))
            .with_context(|| format!("listening on 127.0.0.1:{}", self.port))?;
        eprintln!(
            "serving {} folders on http://127.0.0.1:{}/",
            self.folders.len(),
            self.port
        );
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut r = BufReader::new(s.try_clone()?);
            let mut w = s;
            if let Err(e) = self.connection(&mut r, &mut w) {
                eprintln!("serve: {e:#}");
            }
        }
        Ok(())
    }

    fn file(&self, url: &str) -> Option<PathBuf> {
        let rel = url.trim_start_matches('/');
        let (folder, name) = rel.split_once('/')?;
        if name.contains('/') || name.starts_with('.') || folder.starts_with('.') {
            return None;
        }
        self.folders
            .iter()
            .find(|f| f.file_name().is_some_and(|n| n == folder))
            .map(|f| f.join(name))
            .filter(|p| p.is_file())
    }

    /// Responses served so far (the log's lines): which responses to cut.
    fn cuts_done(&self) -> usize {
        self.log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|t| t.lines().filter(|l| l.ends_with(" cut")).count())
            .unwrap_or(0)
    }

    fn connection(&self, r: &mut impl BufRead, w: &mut impl Write) -> Result<()> {
        let mut first = String::new();
        if r.read_line(&mut first)? == 0 {
            return Ok(());
        }
        let mut range: Option<(u64, Option<u64>)> = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            let Some((k, v)) = h.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("range") {
                let v = v.trim().strip_prefix("bytes=").unwrap_or("");
                if let Some((a, b)) = v.split_once('-') {
                    range = a.parse().ok().map(|a| (a, b.parse().ok()));
                }
            }
        }
        let mut words = first.split_whitespace();
        let (method, url) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        if method != "GET" {
            write!(
                w,
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        }
        let Some(path) = self.file(url) else {
            write!(
                w,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            return Ok(());
        };
        let mut f = fs::File::open(&path)?;
        let total = f.metadata()?.len();
        let (start, end) = match range {
            Some((a, b)) if a < total => (a, b.unwrap_or(total - 1).min(total - 1)),
            Some(_) => {
                write!(w, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
            None => (0, total.saturating_sub(1)),
        };
        let len = if total == 0 { 0 } else { end + 1 - start };
        if range.is_some() {
            write!(w, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{total}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")?;
        } else {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
        }
        let cut =
            self.cut_first > self.cuts_done() && start >= self.cut_from && len > self.cut_after;
        let send = if cut { self.cut_after } else { len };
        f.seek(SeekFrom::Start(start))?;
        let mut body = Vec::new();
        f.take(send).read_to_end(&mut body)?;
        w.write_all(&body)?;
        w.flush()?;
        if let Some(log) = &self.log {
            let mut l = fs::OpenOptions::new().create(true).append(true).open(log)?;
            writeln!(
                l,
                "{url} {start} {len} {}{}",
                body.len(),
                if cut { " cut" } else { "" }
            )?;
        }
        Ok(())
    }
}

/// The log's lines: (offset, bytes sent, cut).
pub fn read_log(path: &Path) -> Vec<(u64, u64, bool)> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((
                w.get(1)?.parse().ok()?,
                w.get(3)?.parse().ok()?,
                w.get(4) == Some(&"cut"),
            ))
        })
        .collect()
}
