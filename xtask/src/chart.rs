//! Boot charts: a timeline from kernel start to ready, drawn from the serial console of a check
//! boot (kernel phases from printk timestamps, init start, each service's start from the
//! init's own lines, the ready and services-up markers). `boot.json` holds the same data.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Span {
    pub name: String,
    pub start: f64,
    pub end: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Chart {
    pub board: String,
    pub profile: String,
    pub init: String,
    /// Kernel phases, from console timestamps.
    pub kernel: Vec<Span>,
    /// Guest uptime when the kernel ran /init.
    pub init_start: Option<f64>,
    /// Each service's (first) start, from the init's console lines; it ends at ready.
    pub services: Vec<Span>,
    pub ready: f64,
    pub services_up: Option<f64>,
}

fn stamp(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (t, msg) = rest.split_once(']')?;
    Some((t.trim().parse().ok()?, msg.trim()))
}

/// Reads the chart's data from a serial log.
pub fn from_log(
    log: &str,
    board: &str,
    profile: &str,
    init: &str,
    ready: f64,
    services_up: Option<f64>,
) -> Chart {
    let milestones: &[(&str, &str)] = &[
        ("Unpacking initramfs", "unpack initramfs"),
        (
            "Trying to unpack rootfs image as initramfs",
            "unpack initramfs",
        ),
        ("Freeing initrd memory", "late kernel init"),
        ("Run /init as init process", ""),
    ];
    let mut marks: Vec<(f64, &str)> = vec![(0.0, "kernel init")];
    let mut init_start = None;
    let mut services: Vec<Span> = Vec::new();
    for line in log.lines() {
        let line = line.trim_start_matches('\r');
        if let Some((t, msg)) = stamp(line) {
            for (needle, name) in milestones {
                if msg.contains(needle) && !marks.iter().any(|(_, n)| n == name) {
                    if needle.starts_with("Run /init") {
                        init_start = Some(t);
                    }
                    marks.push((t, name));
                }
            }
        }
        // "bonsai-init: started NAME (pid N) at 1.234s" or "bonsai: started NAME at 1.23s"
        if let Some(rest) = line
            .split("started ")
            .nth(1)
            .filter(|_| line.starts_with("bonsai-init: ") || line.starts_with("bonsai: "))
        {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            // "all services started at 1.2s" is no service.
            if name == "at" || line.contains("all services started") {
                continue;
            }
            let at = rest
                .rsplit("at ")
                .next()
                .and_then(|t| t.trim().trim_end_matches('s').parse::<f64>().ok());
            if let Some(at) = at {
                if !name.is_empty() && !services.iter().any(|s| s.name == name) {
                    services.push(Span {
                        name,
                        start: at,
                        end: ready.max(at),
                    });
                }
            }
        }
    }
    marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut kernel = Vec::new();
    for w in marks.windows(2) {
        if !w[0].1.is_empty() {
            kernel.push(Span {
                name: w[0].1.to_string(),
                start: w[0].0,
                end: w[1].0,
            });
        }
    }
    Chart {
        board: board.into(),
        profile: profile.into(),
        init: init.into(),
        kernel,
        init_start,
        services,
        ready,
        services_up,
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG timeline: one row per kernel phase, init and service.
pub fn svg(c: &Chart) -> String {
    let end = c.ready.max(c.services_up.unwrap_or(0.0)).max(0.001) * 1.05;
    let (left, width, row) = (190.0, 760.0, 22.0);
    let x = |t: f64| left + width * (t / end);
    let mut rows: Vec<(String, f64, f64, &str)> = Vec::new();
    for k in &c.kernel {
        rows.push((format!("kernel: {}", k.name), k.start, k.end, "#4e79a7"));
    }
    if let Some(s) = c.init_start {
        rows.push((format!("init ({})", c.init), s, c.ready, "#f28e2b"));
    }
    for s in &c.services {
        rows.push((format!("service {}", s.name), s.start, s.end, "#59a14f"));
    }
    let height = 70.0 + row * rows.len() as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="980" height="{height}" font-family="sans-serif" font-size="12">
<title>bonsai boot chart: {board} ({profile}, init {init})</title>
<text x="10" y="18" font-size="14" font-weight="bold">{board} ({profile}, init {init}): ready at {ready:.3} s guest uptime</text>
"#,
        board = esc(&c.board),
        profile = esc(&c.profile),
        init = esc(&c.init),
        ready = c.ready
    );
    // time axis
    let step = if end > 4.0 {
        1.0
    } else if end > 1.0 {
        0.25
    } else {
        0.1
    };
    let mut t = 0.0;
    while t <= end {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="30" x2="{0:.1}" y2="{1}" stroke="#ddd"/><text x="{0:.1}" y="{2}" text-anchor="middle" fill="#666">{3:.2}s</text>"##,
            x(t),
            height - 20.0,
            height - 6.0,
            t
        );
        t += step;
    }
    for (i, (name, s, e, color)) in rows.iter().enumerate() {
        let y = 36.0 + row * i as f64;
        let w = (x(*e) - x(*s)).max(2.0);
        let _ = writeln!(
            out,
            r#"<text x="10" y="{ty:.1}">{name}</text><rect x="{rx:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{color}"><title>{name}: {s:.3} s to {e:.3} s</title></rect>"#,
            ty = y + 14.0,
            name = esc(name),
            rx = x(*s),
            h = row - 6.0,
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{0:.1}" y1="30" x2="{0:.1}" y2="{1}" stroke="#e15759" stroke-width="2"/><text x="{0:.1}" y="28" fill="#e15759" text-anchor="end">ready</text>"##,
        x(c.ready),
        height - 20.0
    );
    out.push_str("</svg>\n");
    out
}

/// Writes boot.svg and boot.json into `out`.
pub fn write(out: &Path, chart: &Chart) -> Result<()> {
    std::fs::write(out.join("boot.svg"), svg(chart))
        .with_context(|| format!("writing {}/boot.svg", out.display()))?;
    std::fs::write(
        out.join("boot.json"),
        serde_json::to_string_pretty(chart)? + "\n",
    )
    .with_context(|| format!("writing {}/boot.json", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kernel_phases_and_service_starts() {
        let log = "[    0.000000] Linux version 6.1\n[    0.300000] Trying to unpack rootfs image as initramfs...\n[    0.500000] Freeing initrd memory: 100K\n[    0.700000] Run /init as init process\nbonsai-init: started ticker (pid 7) at 0.750s\nbonsai: started web at 0.80s\nbonsai-init: all services started at 0.85s\n";
        let c = from_log(log, "b", "p", "bonsai-init", 0.9, Some(0.9));
        assert_eq!(c.init_start, Some(0.7));
        let names: Vec<&str> = c.kernel.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            ["kernel init", "unpack initramfs", "late kernel init"]
        );
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].start, 0.75);
        let svg = svg(&c);
        assert!(
            svg.starts_with("<svg")
                && svg.contains("service ticker")
                && svg.trim_end().ends_with("</svg>")
        );
    }
}
