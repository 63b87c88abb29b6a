//! `cargo xtask serve <release folder>...`: serves release folders over HTTP/1.1 with range
//! requests, for devices to fetch bundles from. `/<folder name>/<file>` is a file of one of
//! the folders (or below it, as a binary cache's `nar/`); HEAD says whether it is there. With `--stdio` it answers one connection on stdin and stdout: what QEMU's
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
        // The port the kernel chose for `--port 0`.
        eprintln!(
            "serving {} folders on http://127.0.0.1:{}/",
            self.folders.len(),
            l.local_addr()?.port()
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
        // Files below the folder too (a binary cache's nar/), never a hidden or `..` part.
        let hidden = |part: &str| part.is_empty() || part.starts_with('.');
        if name.split('/').any(hidden) || hidden(folder) {
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
        // More than one range (zsync asks for several at once): a multipart answer.
        let mut ranges: Vec<(u64, Option<u64>)> = Vec::new();
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
                ranges = v
                    .split(',')
                    .filter_map(|r| {
                        let (a, b) = r.trim().split_once('-')?;
                        Some((a.parse().ok()?, b.parse().ok()))
                    })
                    .collect();
                range = ranges.first().copied();
            }
        }
        let mut words = first.split_whitespace();
        let (method, url) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        // HEAD: whether a file is there (Nix asks so of a binary cache), without the body.
        if method == "HEAD" {
            match self.file(url).map(|p| fs::metadata(p).map(|m| m.len())) {
                Some(Ok(len)) => write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                )?,
                _ => write!(
                    w,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?,
            }
            return Ok(());
        }
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
        if ranges.len() > 1 {
            return self.multipart(w, url, &mut f, total, &ranges);
        }
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

impl Serve {
    /// A 206 with `multipart/byteranges`, one part per range (each logged as a response).
    fn multipart(
        &self,
        w: &mut impl Write,
        url: &str,
        f: &mut fs::File,
        total: u64,
        ranges: &[(u64, Option<u64>)],
    ) -> Result<()> {
        const BOUNDARY: &str = "bonsai-byteranges";
        let mut body = Vec::new();
        let mut parts = Vec::new();
        for &(a, b) in ranges {
            if a >= total {
                continue;
            }
            let end = b.unwrap_or(total - 1).min(total - 1);
            if end < a {
                continue;
            }
            write!(
                body,
                "\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{end}/{total}\r\n\r\n"
            )?;
            f.seek(SeekFrom::Start(a))?;
            let len = end + 1 - a;
            let n = Read::by_ref(f).take(len).read_to_end(&mut body)?;
            parts.push((a, len, n));
        }
        if parts.is_empty() {
            write!(w, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
        write!(body, "\r\n--{BOUNDARY}--\r\n")?;
        write!(
            w,
            "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        w.write_all(&body)?;
        w.flush()?;
        if let Some(log) = &self.log {
            let mut l = fs::OpenOptions::new().create(true).append(true).open(log)?;
            for (a, len, n) in parts {
                writeln!(l, "{url} {a} {len} {n}")?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(s: &Serve, range: &str) -> String {
        let req = format!("GET /rel/f.bin HTTP/1.1\r\nHost: x\r\nRange: {range}\r\n\r\n");
        let mut out = Vec::new();
        s.connection(&mut req.as_bytes(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn request(s: &Serve, req: &str) -> String {
        let mut out = Vec::new();
        s.connection(&mut req.as_bytes(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn files_below_a_folder_and_head_requests_are_answered_hidden_ones_never() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        fs::create_dir_all(cache.join("nar")).unwrap();
        fs::write(cache.join("nar/x.nar.xz"), b"nar!").unwrap();
        fs::write(cache.join(".secret"), b"no").unwrap();
        let s = Serve {
            folders: vec![cache],
            port: 0,
            stdio: false,
            log: None,
            cut_first: 0,
            cut_after: 0,
            cut_from: 0,
        };
        let get = request(&s, "GET /cache/nar/x.nar.xz HTTP/1.1\r\n\r\n");
        assert!(
            get.starts_with("HTTP/1.1 200 OK\r\n") && get.ends_with("\r\n\r\nnar!"),
            "{get}"
        );
        let head = request(&s, "HEAD /cache/nar/x.nar.xz HTTP/1.1\r\n\r\n");
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
        );
        for url in [
            "/cache/none.narinfo",
            "/cache/.secret",
            "/cache/nar/../.secret",
            "/cache//x",
        ] {
            for m in ["GET", "HEAD"] {
                let r = request(&s, &format!("{m} {url} HTTP/1.1\r\n\r\n"));
                assert!(
                    r.starts_with("HTTP/1.1 404 Not Found\r\n"),
                    "{m} {url}: {r}"
                );
            }
        }
    }

    #[test]
    fn one_range_is_a_206_and_several_are_multipart_each_logged() {
        let d = tempfile::tempdir().unwrap();
        let rel = d.path().join("rel");
        fs::create_dir(&rel).unwrap();
        fs::write(rel.join("f.bin"), b"0123456789abcdef").unwrap();
        let log = d.path().join("log");
        let s = Serve {
            folders: vec![rel],
            port: 0,
            stdio: false,
            log: Some(log.clone()),
            cut_first: 0,
            cut_after: 0,
            cut_from: 0,
        };
        let one = ask(&s, "bytes=2-5");
        assert!(one.starts_with("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-5/16\r\nContent-Length: 4\r\n"), "{one}");
        assert!(one.ends_with("\r\n\r\n2345"), "{one}");
        let many = ask(&s, "bytes=0-1, 10-12,14-");
        assert!(
            many.contains("Content-Type: multipart/byteranges; boundary=bonsai-byteranges\r\n"),
            "{many}"
        );
        let body = many.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(
            body,
            "\r\n--bonsai-byteranges\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/16\r\n\r\n01\
             \r\n--bonsai-byteranges\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 10-12/16\r\n\r\nabc\
             \r\n--bonsai-byteranges\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 14-15/16\r\n\r\nef\
             \r\n--bonsai-byteranges--\r\n"
        );
        assert!(
            many.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{many}"
        );
        assert_eq!(
            read_log(&log),
            [(2, 4, false), (0, 2, false), (10, 3, false), (14, 2, false)]
        );
        assert!(ask(&s, "bytes=40-50,60-70").starts_with("HTTP/1.1 416 "));
    }
}
