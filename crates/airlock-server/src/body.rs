//! Reading hostile request bodies: content type, size cap, nesting depth,
//! then strict deserialisation (unknown fields rejected by the types).

use axum::body::Body;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// Deepest JSON nesting accepted. Our request types nest at most 3 deep.
pub const MAX_DEPTH: usize = 16;

/// Reads and parses a JSON body, which must arrive whole within
/// `deadline` (a body trickled a byte at a time cannot hold a connection).
pub async fn json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<T, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    parse(&read(headers, body, limit, deadline).await?)
}

/// Reads a body whole: at most `limit` bytes (a larger `Content-Length`
/// is refused before anything is read), within `deadline`.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    deadline: std::time::Duration,
) -> Result<axum::body::Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    tokio::time::timeout(deadline, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout(deadline.as_millis()))?
        .map_err(|_| ApiError::PayloadTooLarge(limit))
}

/// Parses bytes already read: a JSON object (every request body is one; a
/// struct would otherwise also accept an array of its fields in order).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    check_depth(bytes)?;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b) if *b != b'{') {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        // serde_json's messages name fields and positions, never anything
        // of the host.
        // serde_json quotes what it refused (an unknown field, a bad
        // variant): bounded, since it is the caller's.
        let msg: String = e.to_string().chars().take(300).collect();
        match e.classify() {
            Category::Data => ApiError::InvalidRequest(msg),
            Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(msg),
        }
    })
}

/// The integer a JSON number stands for: `424` or `424.0` (JSON Schema
/// calls both integers), never `424.5`.
pub fn integral(f: f64) -> Option<i64> {
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

/// An optional non-negative integer field written as any JSON number that
/// is an integer (`null`: absent).
pub fn opt_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize;
    let n = Option::<serde_json::Number>::deserialize(d)?;
    n.map(|n| {
        n.as_u64()
            .or_else(|| integral(n.as_f64()?).and_then(|i| u64::try_from(i).ok()))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("expected a non-negative integer, not {n}"))
            })
    })
    .transpose()
}

/// Like [`opt_u64`], signed.
pub fn opt_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::Deserialize;
    let n = Option::<serde_json::Number>::deserialize(d)?;
    n.map(|n| {
        n.as_i64()
            .or_else(|| integral(n.as_f64()?))
            .ok_or_else(|| serde::de::Error::custom(format!("expected an integer, not {n}")))
    })
    .transpose()
}

/// Rejects nesting deeper than [`MAX_DEPTH`] before any parser recursion.
pub(crate) fn check_depth(bytes: &[u8]) -> Result<(), ApiError> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ApiError::JsonTooDeep(MAX_DEPTH));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        a: u32,
    }

    #[test]
    fn hostile_bodies() {
        assert!(parse::<T>(br#"{"a":1}"#).is_ok());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(
            parse::<T>(deep.as_bytes()),
            Err(ApiError::JsonTooDeep(_))
        ));
        // Brackets inside strings do not count.
        let s = format!(r#"{{"a":1,"b":"{}"}}"#, "[".repeat(100));
        assert!(matches!(
            parse::<T>(s.as_bytes()),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            parse::<T>(br#"{"a":"x"}"#),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            parse::<T>(br#"{"a":1,"z":2}"#),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            parse::<T>(b"{\"a\":1"),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(matches!(
            parse::<T>(b"{\"a\":\"\xff\"}"),
            Err(ApiError::InvalidJson(_))
        ));
        // A struct's fields as an array are not a request.
        assert!(matches!(
            parse::<T>(b" [1]"),
            Err(ApiError::InvalidRequest(_))
        ));
    }
}
