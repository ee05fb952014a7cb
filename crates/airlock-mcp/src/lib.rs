//! airlock's MCP server: the tools an agent calls to run code in sandboxes
//! (`sandbox_run`, `sandbox_create`, `sandbox_exec`, the `sandbox_fs_*`
//! tools, `sandbox_snapshot`, `sandbox_kill`, `sandbox_list`), served over
//! stdio by `airlock mcp` and over Streamable HTTP at `/mcp` by
//! `airlock serve`.
//!
//! Every tool call is made of requests to the airlock HTTP API, sent as the
//! caller through an [`Api`]: inside the server, through its own router in
//! process (the same authentication, tenant scoping, limits, validation and
//! audit as any API request); from `airlock mcp`, over HTTP to a server with
//! the tenant's key. This layer keeps no state and can grant nothing the
//! API does not: what it adds is argument checking and the tools' shapes.

mod tools;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};

pub use tools::{MAX_READ_BYTES, TOOLS, path_segments};

/// One request of the airlock API a tool makes.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: http::Method,
    /// Path and query, percent-encoded (`/v1/sessions/ses_…/files/a%20b`).
    pub path: String,
    /// `Content-Type` of `body`, when there is a body.
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
    /// The most of the answer's body to read (default: the
    /// implementation's own cap); a larger one is an error, never read
    /// whole.
    pub max_answer: Option<u64>,
}

/// The API's answer.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Vec<u8>,
    /// Its `Retry-After`, for a caller to pass on.
    pub retry_after: Option<String>,
}

/// A request on its way; its error is shown to the caller as it is, so it
/// names no host path or internal detail.
pub type ApiFuture = BoxFuture<'static, Result<ApiResponse, String>>;

/// How the tools reach the airlock API, as the caller of the MCP request.
pub trait Api: Send + Sync + 'static {
    /// Sends `req` on behalf of the MCP request `via` arrived in (the HTTP
    /// request that carried it over Streamable HTTP; `None` over stdio,
    /// where the implementation holds the credentials itself).
    fn send(&self, req: ApiRequest, via: Option<&http::request::Parts>) -> ApiFuture;
}

/// The MCP server handler over an [`Api`].
#[derive(Debug)]
pub struct Server<A> {
    api: Arc<A>,
}

impl<A> Clone for Server<A> {
    fn clone(&self) -> Self {
        Server {
            api: Arc::clone(&self.api),
        }
    }
}

impl<A: Api> Server<A> {
    pub fn new(api: Arc<A>) -> Self {
        Server { api }
    }
}

/// What `initialize` tells the client about the server and its tools.
const INSTRUCTIONS: &str = "airlock runs code in isolated sandboxes. \
sandbox_run runs one program (python, javascript or shell) in a fresh sandbox and returns its \
exit status, stdout and stderr. For work over several steps, sandbox_create opens a session with \
a private /workspace (the working directory of everything run in it); sandbox_exec runs code or a \
shell command in it, the sandbox_fs_* tools read, write and list its files (paths relative to \
/workspace), sandbox_snapshot records the workspace, and sandbox_kill ends the session. Every \
execution gets a fresh sandbox: only /workspace persists between them. There is no network \
unless the operator allows it.";

impl<A: Api> ServerHandler for Server<A> {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("airlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::list()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools::list().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // Over Streamable HTTP the transport hands over the HTTP request
        // (its credentials and peer); over stdio there is none.
        let via = ctx.extensions.get::<http::request::Parts>();
        let args = request.arguments.unwrap_or_default();
        // A request the client cancels ends here; the tool's own
        // execution, if one runs, is cancelled as its call is dropped.
        let called = tokio::select! {
            r = tools::call(self.api.as_ref(), via, &request.name, args) => r,
            () = ctx.ct.cancelled() => {
                return Err(ErrorData::internal_error("the request was cancelled", None));
            }
        };
        match called {
            Some(result) => Ok(result.into()),
            None => Err(ErrorData::invalid_params(
                format!("no tool named {:?}", truncate(&request.name, 64)),
                None,
            )),
        }
    }
}

/// At most `max` characters of `s` (for echoing a caller's input back).
pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}
