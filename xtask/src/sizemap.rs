//! The size map: one self-contained HTML file (no scripts, no network) with a squarified
//! treemap of the image by store path and file, hover details (title attributes), and the
//! closure-vs-image comparison per store path.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::size::{report, Report};

/// A rectangle in percent of the map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// Squarified treemap (Bruls, Huizing, van Wijk): lays `weights` (sorted descending, > 0)
/// into `area`, returning one rectangle per weight in the same order.
pub fn squarify(weights: &[f64], area: Rect) -> Vec<Rect> {
    let mut out = vec![
        Rect {
            x: 0.0,
            y: 0.0,
            w: 0.0,
            h: 0.0
        };
        weights.len()
    ];
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || weights.is_empty() {
        return out;
    }
    let scale = area.w * area.h / total;
    let areas: Vec<f64> = weights.iter().map(|w| w * scale).collect();
    let mut rect = area;
    let mut i = 0;
    while i < areas.len() {
        let side = rect.w.min(rect.h);
        let mut row = vec![i];
        let mut best = worst(&areas, &row, side);
        while i + row.len() < areas.len() {
            let mut next = row.clone();
            next.push(i + row.len());
            let w = worst(&areas, &next, side);
            if w > best {
                break;
            }
            row = next;
            best = w;
        }
        let sum: f64 = row.iter().map(|&k| areas[k]).sum();
        if rect.w >= rect.h {
            // A column on the left.
            let cw = if rect.h > 0.0 { sum / rect.h } else { 0.0 };
            let mut y = rect.y;
            for &k in &row {
                let h = if cw > 0.0 { areas[k] / cw } else { 0.0 };
                out[k] = Rect {
                    x: rect.x,
                    y,
                    w: cw,
                    h,
                };
                y += h;
            }
            rect = Rect {
                x: rect.x + cw,
                y: rect.y,
                w: rect.w - cw,
                h: rect.h,
            };
        } else {
            let rh = if rect.w > 0.0 { sum / rect.w } else { 0.0 };
            let mut x = rect.x;
            for &k in &row {
                let w = if rh > 0.0 { areas[k] / rh } else { 0.0 };
                out[k] = Rect {
                    x,
                    y: rect.y,
                    w,
                    h: rh,
                };
                x += w;
            }
            rect = Rect {
                x: rect.x,
                y: rect.y + rh,
                w: rect.w,
                h: rect.h - rh,
            };
        }
        i += row.len();
    }
    out
}

fn worst(areas: &[f64], row: &[usize], side: f64) -> f64 {
    let sum: f64 = row.iter().map(|&k| areas[k]).sum();
    let max = row.iter().map(|&k| areas[k]).fold(0.0, f64::max);
    let min = row.iter().map(|&k| areas[k]).fold(f64::INFINITY, f64::min);
    let s2 = side * side;
    let sum2 = sum * sum;
    if min <= 0.0 || sum2 == 0.0 {
        return f64::INFINITY;
    }
    (s2 * max / sum2).max(sum2 / (s2 * min))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn short_store(name: &str) -> String {
    name.strip_prefix("/nix/store/")
        .map(|r| r.get(33..).unwrap_or(r).to_string())
        .unwrap_or_else(|| name.to_string())
}

const COLORS: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Renders the map; returns the HTML and the number of file boxes drawn.
pub fn render(by_path: &Report, by_file: &Report) -> (String, usize) {
    let groups: Vec<&crate::size::Row> =
        by_path.rows.iter().filter(|r| r.image_bytes > 0).collect();
    let weights: Vec<f64> = groups.iter().map(|r| r.image_bytes as f64).collect();
    let outer = squarify(
        &weights,
        Rect {
            x: 0.0,
            y: 0.0,
            w: 100.0,
            h: 100.0,
        },
    );
    let mut boxes = String::new();
    let mut count = 0;
    for (gi, (g, r)) in groups.iter().zip(&outer).enumerate() {
        let color = COLORS[gi % COLORS.len()];
        let _ = write!(
            boxes,
            r#"<div class="group" style="left:{:.4}%;top:{:.4}%;width:{:.4}%;height:{:.4}%" title="{}&#10;image {} B, kept {} B, closure {} B, compressed {} B"><span class="label">{}</span>"#,
            r.x,
            r.y,
            r.w,
            r.h,
            esc(&g.name),
            g.image_bytes,
            g.kept_bytes,
            g.closure_bytes,
            g.compressed_bytes,
            esc(&short_store(&g.name))
        );
        let mut files: Vec<&crate::size::Row> = by_file
            .rows
            .iter()
            .filter(|f| f.image_bytes > 0 && f.name.starts_with(&format!("{}/", g.name)))
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.image_bytes));
        let fw: Vec<f64> = files.iter().map(|f| f.image_bytes as f64).collect();
        // Files fill the group below its label line.
        let inner = squarify(
            &fw,
            Rect {
                x: 0.0,
                y: 0.0,
                w: 100.0,
                h: 100.0,
            },
        );
        boxes.push_str(r#"<div class="files">"#);
        for (f, fr) in files.iter().zip(&inner) {
            count += 1;
            let rel = f.name.strip_prefix(&g.name).unwrap_or(&f.name);
            let _ = write!(
                boxes,
                r#"<div class="file" data-bytes="{}" style="left:{:.4}%;top:{:.4}%;width:{:.4}%;height:{:.4}%;background:{color}" title="{}&#10;{} B in the image ({} B before stripping, {} B compressed)">{}</div>"#,
                f.image_bytes,
                fr.x,
                fr.y,
                fr.w,
                fr.h,
                esc(&f.name),
                f.image_bytes,
                f.kept_bytes,
                f.compressed_bytes,
                if fr.w * r.w > 300.0 && fr.h * r.h > 60.0 {
                    esc(rel.trim_start_matches('/'))
                } else {
                    String::new()
                }
            );
        }
        boxes.push_str("</div></div>");
    }
    let mut table = String::new();
    for row in by_path.rows.iter().chain(std::iter::once(&by_path.total)) {
        let pct = if row.closure_bytes > 0 {
            100.0 * row.image_bytes as f64 / row.closure_bytes as f64
        } else {
            0.0
        };
        let _ = write!(
            table,
            r#"<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><div class="bar"><div style="width:{:.1}%"></div></div></td></tr>"#,
            esc(&short_store(&row.name)),
            row.closure_bytes,
            row.kept_bytes,
            row.image_bytes,
            row.compressed_bytes,
            pct.min(100.0)
        );
    }
    for v in &by_path.vanished {
        let _ = write!(
            table,
            r#"<tr class="gone"><td>{}</td><td colspan="5">vanished: nothing kept refers to it</td></tr>"#,
            esc(&short_store(v))
        );
    }
    let html = format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bonsai size map: {board}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:16px;color:#222}}
h1{{font-size:18px}}
#map{{position:relative;width:100%;height:560px;border:1px solid #999;background:#eee}}
.group{{position:absolute;box-sizing:border-box;border:2px solid #fff;overflow:hidden}}
.group>.label{{position:absolute;left:2px;top:0;font-weight:bold;font-size:12px;z-index:2;background:rgba(255,255,255,.7)}}
.files{{position:absolute;left:0;right:0;top:16px;bottom:0}}
.file{{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.6);font-size:10px;color:#fff;overflow:hidden;white-space:nowrap}}
.file:hover{{outline:2px solid #000;z-index:3}}
table{{border-collapse:collapse;margin-top:16px}}td,th{{padding:2px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
.bar{{width:160px;height:10px;background:#ddd}}.bar>div{{height:10px;background:#59a14f}}
tr.gone td{{color:#999}}
</style></head><body>
<h1>{board} ({profile}, init {init}): {image} B in the image, {compressed} B compressed ({compression}), from {closure} B of closure</h1>
<div id="map" data-boxes="{count}">{boxes}</div>
<table><tr><th>store path</th><th>closure</th><th>kept</th><th>image</th><th>compressed</th><th>image / closure</th></tr>{table}</table>
</body></html>
"#,
        board = esc(&by_path.board),
        profile = esc(&by_path.profile),
        init = esc(&by_path.init),
        image = by_path.total.image_bytes,
        compressed = by_path.total.compressed_bytes,
        compression = by_path.compression,
        closure = by_path.total.closure_bytes,
    );
    (html, count)
}

/// Writes out/<board>/size-map.html and returns its path.
pub fn write(out: &Path, by_path: &Report) -> Result<PathBuf> {
    let by_file = report(out, true)?;
    let (html, _) = render(by_path, &by_file);
    let path = out.join("size-map.html");
    std::fs::write(&path, html).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squarify_covers_the_area_without_overlap() {
        let w = [50.0, 25.0, 12.5, 6.25, 6.25];
        let rects = squarify(
            &w,
            Rect {
                x: 0.0,
                y: 0.0,
                w: 100.0,
                h: 50.0,
            },
        );
        let area: f64 = rects.iter().map(|r| r.w * r.h).sum();
        assert!((area - 5000.0).abs() < 1e-6, "{area}");
        for (r, w) in rects.iter().zip(w) {
            assert!((r.w * r.h - w / 100.0 * 5000.0).abs() < 1e-6);
        }
        for (i, a) in rects.iter().enumerate() {
            for b in &rects[i + 1..] {
                let ox = (a.x + a.w).min(b.x + b.w) - a.x.max(b.x);
                let oy = (a.y + a.h).min(b.y + b.h) - a.y.max(b.y);
                assert!(ox <= 1e-9 || oy <= 1e-9, "{a:?} overlaps {b:?}");
            }
        }
    }
}
