//! `airlock mcp`: the MCP server over stdio, for agents that start their
//! tools as processes (desktop assistants, coding agents). Every tool call
//! is made over HTTP to a running `airlock serve` with the tenant's key
//! from `AIRLOCK_API_KEY` (never the command line, which other users can
//! read in the process list): the server authenticates, scopes, limits and
//! audits each one as any API request.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use airlock_mcp::{Api, ApiFuture, ApiRequest, ApiResponse};
use rmcp::ServiceExt;

use crate::Usage;
use crate::client::Target;

/// Largest answer read from the server.
const MAX_ANSWER: u64 = 256 << 20;

/// How long one call may wait for its answer: a tool runs an execution and
/// waits for it, and the server's longest wall-clock limit is a day.
const CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600 + 60);

#[derive(clap::Args, Debug)]
pub struct McpArgs {
    /// The airlock server the tools use (e.g. http://127.0.0.1:7070); the
    /// tenant's API key is read from AIRLOCK_API_KEY.
    #[arg(long, value_name = "URL", env = "AIRLOCK_SERVER")]
    server: String,
    /// CA certificates (PEM) to verify an https:// server with.
    #[arg(long, value_name = "FILE", env = "AIRLOCK_CA")]
    ca: Option<PathBuf>,
}

/// The tools' way to the API: HTTP to the server, one connection a call.
struct Http {
    target: Target,
    url: String,
    ca: Option<PathBuf>,
    key: zeroize::Zeroizing<String>,
}

impl Http {
    /// One request, blocking.
    fn exchange(&self, req: &ApiRequest) -> Result<ApiResponse, String> {
        let unreachable =
            |e: String| format!("cannot reach the airlock server at {}: {e}", self.url);
        let mut conn = crate::client::connect(&self.target, self.ca.as_deref(), CALL_TIMEOUT)
            .map_err(unreachable)?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            req.method,
            req.path,
            self.target.authority,
            self.key.as_str(),
            req.body.len()
        );
        if let Some(ct) = req.content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        let mut raw = zeroize::Zeroizing::new(head.into_bytes());
        raw.extend_from_slice(&req.body);
        // The head, then at most the body the caller wants.
        let max = req.max_answer.map_or(MAX_ANSWER, |m| m.min(MAX_ANSWER));
        let answer = crate::client::exchange(conn.as_mut(), &raw, max + (64 << 10))
            .map_err(|e| unreachable(e.to_string()))?;
        if answer.len() as u64 >= max + (64 << 10) {
            return Err(format!("the answer is larger than {max} bytes"));
        }
        let (status, body) = crate::remote::split_response(&answer).ok_or_else(|| {
            format!(
                "the airlock server at {} sent no valid HTTP answer",
                self.url
            )
        })?;
        if body.len() as u64 > max {
            return Err(format!("the answer is larger than {max} bytes"));
        }
        Ok(ApiResponse {
            status,
            body,
            retry_after: None,
        })
    }
}

impl Api for Http {
    fn send(&self, req: ApiRequest, _via: Option<&http::request::Parts>) -> ApiFuture {
        let me = Http {
            target: self.target.clone(),
            url: self.url.clone(),
            ca: self.ca.clone(),
            key: self.key.clone(),
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.exchange(&req))
                .await
                .map_err(|_| "the call was interrupted".to_string())?
        })
    }
}

pub fn run(args: McpArgs) -> ExitCode {
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Usage(msg)) => {
            eprintln!("airlock: {msg}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: McpArgs) -> Result<(), Usage> {
    let target = crate::client::target(&args.server).map_err(|e| Usage(format!("--server {e}")))?;
    let key = std::env::var("AIRLOCK_API_KEY")
        .map_err(|_| Usage("airlock mcp needs the API key in AIRLOCK_API_KEY".into()))?;
    if key.is_empty() || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Usage("AIRLOCK_API_KEY is not a valid API key".into()));
    }
    let http = Http {
        target,
        url: args.server.trim_end_matches('/').to_string(),
        ca: args.ca,
        key: zeroize::Zeroizing::new(key),
    };
    // A wrong URL or key is reported now, on one line, rather than as the
    // first tool call's error.
    let probe = http
        .exchange(&ApiRequest {
            method: http::Method::GET,
            path: "/v1/sessions?limit=1".into(),
            content_type: None,
            body: Vec::new(),
            max_answer: None,
        })
        .map_err(Usage)?;
    match probe.status {
        401 => {
            return Err(Usage(format!(
                "{}: the server refused AIRLOCK_API_KEY",
                http.url
            )));
        }
        429 => {
            return Err(Usage(format!(
                "{}: too many failed authentications from here; retry later",
                http.url
            )));
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Usage(format!("cannot start: {e}")))?;
    rt.block_on(async move {
        // stdout carries the protocol: nothing else is written to it.
        let server = match airlock_mcp::Server::new(Arc::new(http))
            .serve(rmcp::transport::stdio())
            .await
        {
            Ok(s) => s,
            // The client went away before it began: nothing to serve.
            Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => return Ok(()),
            Err(e) => return Err(Usage(format!("MCP over stdio: {e}"))),
        };
        server
            .waiting()
            .await
            .map_err(|e| Usage(format!("MCP over stdio: {e}")))?;
        Ok(())
    })
}
