//! `airlock run --server URL`: the same command, executed by a running
//! `airlock serve` (warm pools, broker, audit) instead of a local cold
//! sandbox. The API key comes from `AIRLOCK_API_KEY` (never from the command
//! line, where other users could read it in the process list).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Usage;

/// Largest response read from the server (records carry up to the output
/// caps of the server's ceilings).
const MAX_RESPONSE: u64 = 256 << 20;

/// What `run` sends.
pub struct Remote<'a> {
    pub url: &'a str,
    pub language: &'a str,
    pub code: &'a [u8],
    pub stdin: &'a [u8],
    pub limits: serde_json::Map<String, Value>,
    /// The weakest isolation the server may run the code behind.
    pub isolation: Option<&'a str>,
    /// One of the server's backends by name.
    pub backend: Option<&'a str>,
    pub json: bool,
    /// CA certificates to verify an https:// server with (default: the
    /// system's).
    pub ca: Option<&'a std::path::Path>,
}

/// Body of an HTTP/1.1 response read to its end (Content-Length or chunked).
pub(crate) fn split_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        // A response cut short (a connection closed early, a TLS stream
        // ended without close_notify) is not a response.
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        return match length {
            Some(n) => Some((status, body.get(..n)?.to_vec())),
            None => Some((status, body.to_vec())),
        };
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_hex = std::str::from_utf8(&rest[..nl]).ok()?;
        let size = usize::from_str_radix(size_hex.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

pub fn run(r: Remote<'_>) -> Result<ExitCode, Usage> {
    let t = crate::client::target(r.url).map_err(|e| Usage(format!("--server {e}")))?;
    let key = std::env::var("AIRLOCK_API_KEY")
        .map_err(|_| Usage("--server needs the API key in AIRLOCK_API_KEY".into()))?;
    if key.is_empty() || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Usage("AIRLOCK_API_KEY is not a valid API key".into()));
    }
    let code = std::str::from_utf8(r.code)
        .map_err(|_| Usage("--server sends code as text: it must be UTF-8".into()))?;
    let stdin = std::str::from_utf8(r.stdin)
        .map_err(|_| Usage("--server sends stdin as text: it must be UTF-8".into()))?;
    let mut body = json!({"language": r.language, "code": code, "stdin": stdin});
    if let Some(level) = r.isolation {
        body["isolation"] = level.into();
    }
    if let Some(name) = r.backend {
        body["backend"] = name.into();
    }
    if !r.limits.is_empty() {
        body["limits"] = Value::Object(r.limits);
    }
    let body = serde_json::to_vec(&body).map_err(|e| Usage(e.to_string()))?;
    // The server answers when the execution ends: allow its longest limit.
    let mut conn = crate::client::connect(&t, r.ca, Duration::from_secs(24 * 3600 + 60))
        .map_err(|e| Usage(format!("--server {}: {e}", r.url)))?;
    let mut req = format!(
        "POST /v1/executions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        t.authority,
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let raw = crate::client::exchange(conn.as_mut(), &req, MAX_RESPONSE)
        .map_err(|e| Usage(format!("--server {}: {e}", r.url)))?;
    let (status, body) = split_response(&raw)
        .ok_or_else(|| Usage(format!("--server {}: not an HTTP response", r.url)))?;
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|_| Usage(format!("--server {}: the answer is not JSON", r.url)))?;
    if status != 200 {
        // problem+json: one line with the server's stable code.
        let detail = doc["detail"]
            .as_str()
            .or(doc["title"].as_str())
            .unwrap_or("");
        let code = doc["code"].as_str().unwrap_or("error");
        let line = format!("server refused the execution ({status} {code}): {detail}");
        if (400..500).contains(&status) && status != 429 {
            return Err(Usage(line));
        }
        eprintln!("airlock: {line}");
        return Ok(ExitCode::from(125));
    }
    let res = &doc["result"];
    if r.json {
        println!("{doc}");
    } else {
        let mut out = std::io::stdout();
        let _ = out.write_all(res["stdout"].as_str().unwrap_or("").as_bytes());
        let _ = out.flush();
        let _ = std::io::stderr().write_all(res["stderr"].as_str().unwrap_or("").as_bytes());
    }
    let reason = doc["reason"].as_str().unwrap_or("internal_error");
    if reason == "internal_error" || res.is_null() {
        if !r.json {
            eprintln!("airlock: sandbox failed on the server");
        }
        return Ok(ExitCode::from(125));
    }
    if r.json {
        return Ok(ExitCode::SUCCESS);
    }
    if reason != "exited" {
        eprintln!("airlock: {reason}: the execution was stopped by a limit or the server");
    }
    let code = match (res["exit_code"].as_i64(), res["signal"].as_i64()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 125,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_split_with_length_or_chunks() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(split_response(raw), Some((200, b"{}".to_vec())));
        let raw = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n3\r\na\":\r\n2\r\n1}\r\n0\r\n\r\n";
        assert_eq!(split_response(raw), Some((201, b"{\"a\":1}".to_vec())));
        // Truncated or malformed: refused, never a panic.
        assert_eq!(split_response(b"HTTP/1.1 200 OK\r\n"), None);
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"a\":";
        assert_eq!(split_response(raw), None);
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffff\r\nab";
        assert_eq!(split_response(raw), None);
        assert_eq!(split_response(b"garbage\r\n\r\n"), None);
    }
}
