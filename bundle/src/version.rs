//! Ordering release versions naturally: runs of digits compare as numbers, other runs as text,
//! `.`, `-`, `+` and `_` only separate (`1.10.0` > `1.9.3`, `r10` > `r2`); a version that
//! extends another is newer (`1.0.1` > `1.0`).

use std::cmp::Ordering;

fn tokens(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut digit = false;
    for (i, c) in v.char_indices() {
        if matches!(c, '.' | '-' | '+' | '_') {
            if let Some(s) = start.take() {
                out.push(&v[s..i]);
            }
            continue;
        }
        match start {
            Some(s) if c.is_ascii_digit() != digit => {
                out.push(&v[s..i]);
                start = Some(i);
            }
            None => start = Some(i),
            _ => {}
        }
        digit = c.is_ascii_digit();
    }
    if let Some(s) = start {
        out.push(&v[s..]);
    }
    out
}

/// Compares two versions.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ta, tb) = (tokens(a), tokens(b));
    for (x, y) in ta.iter().zip(tb.iter()) {
        let o = match (x.parse::<u128>(), y.parse::<u128>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ta.len().cmp(&tb.len())
}
