//! What the fuzz targets share: an HTTP/1-like framing of the input (header lines, an empty line, the body),
//! so that seed files are readable and mutations stay meaningful.

#![allow(dead_code)]

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// The input up to the first `\n` and the rest (all of it and nothing when there is no `\n`).
pub fn line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (strip_cr(&data[..i]), &data[i + 1..]),
        None => (strip_cr(data), &[]),
    }
}

/// A line as text (invalid UTF-8 replaced).
pub fn text(line: &[u8]) -> String {
    String::from_utf8_lossy(line).into_owned()
}

/// Header lines and body, split at the first empty line; without one, everything is headers.
pub fn message(data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (l, after) = line(rest);
        rest = after;
        if l.is_empty() {
            return (headers, rest);
        }
        add_header(&mut headers, l);
    }
    (headers, rest)
}

/// Appends one `name: value` line; lines that are not a valid header are skipped. The value is trimmed of
/// spaces and tabs, as an HTTP/1 parser does before the daemon sees it.
pub fn add_header(headers: &mut HeaderMap, l: &[u8]) {
    let Some(colon) = l.iter().position(|&b| b == b':') else { return };
    let Ok(name) = HeaderName::from_bytes(&l[..colon]) else { return };
    let value = trim(&l[colon + 1..]);
    let Ok(value) = HeaderValue::from_bytes(value) else { return };
    headers.append(name, value);
}

/// The bytes without leading and trailing spaces and tabs.
pub fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Sets `name` to `value` (replacing what the input had), when `value` is a valid header value.
pub fn set(headers: &mut HeaderMap, name: &str, value: &str) -> bool {
    match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        (Ok(n), Ok(v)) => {
            headers.insert(n, v);
            true
        }
        _ => false,
    }
}
