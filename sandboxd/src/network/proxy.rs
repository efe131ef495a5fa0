//! The egress proxy: the process sandbox's only way out.
//!
//! Processes in a session sandbox live in a network namespace that has only
//! loopback. When the session's policy has a network allowlist, sandboxd binds
//! a listener on `127.0.0.1:3128` inside that namespace and serves it here, in
//! sandboxd's own runtime, outside the namespace; the sandbox gets
//! `HTTP_PROXY`/`HTTPS_PROXY` pointing at it ([`proxy_environment`]). Programs
//! that ignore the variables simply cannot connect anywhere.
//!
//! Two request forms are served, one request per client connection:
//!
//! - `CONNECT host:port` opens a tunnel: after `200 Connection Established`
//!   bytes are copied both ways until the connection ends.
//! - An absolute-form plain-HTTP request (`GET http://host/path HTTP/1.1`) is
//!   forwarded in origin-form with hop-by-hop and `Proxy-*` headers removed,
//!   `Host` taken from the URL and `Connection: close`, and the response is
//!   relayed.
//!
//! Every destination goes through [`EgressPolicy::connect`], the same checked
//! path the WASI `wasi:http` hook uses: allowlist by name, resolution by
//! sandboxd, special-range refusal unless a granted CIDR covers the address,
//! connection only to the checked address, and one [`EgressLog`] record per
//! decision. Refusals answer `403` with the reason; anything that is not one of
//! the two forms answers `400`. Bounds: a header read timeout, a request head
//! size cap, a connect timeout and a cap on concurrent connections (`503`
//! beyond it), so a sandbox cannot pin unbounded resources in sandboxd.
//!
//! [`EgressLog`]: crate::network::egress::EgressLog

use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use wasmtime_wasi_http::io::TokioIo;

use crate::network::egress::{EgressError, EgressPolicy};

/// Errors of the proxy: starting it, and the steps of serving one client
/// connection (those are logged with `tracing`, never returned to a caller).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `start` was called outside a tokio runtime.
    #[error("the egress proxy must be started inside a tokio runtime")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    /// The listener's address could not be read.
    #[error("cannot read the proxy listener's address")]
    LocalAddr(#[source] std::io::Error),
    /// The listener could not be made non-blocking.
    #[error("cannot make the proxy listener non-blocking")]
    NonBlocking(#[source] std::io::Error),
    /// The listener could not be registered with the runtime.
    #[error("cannot register the proxy listener with the tokio runtime")]
    Register(#[source] std::io::Error),
    /// Reading the request head failed.
    #[error("reading the request head failed")]
    ReadHead(#[source] std::io::Error),
    /// The client sent no complete request head in time.
    #[error("no complete request head within {0:?}")]
    HeadTimeout(Duration),
    /// The request head is larger than the cap.
    #[error("the request head is larger than {0} bytes")]
    HeadTooLarge(usize),
    /// The client closed the connection in the middle of the request head.
    #[error("the client closed the connection before the request head was complete")]
    HeadTruncated,
    /// The request is not one the proxy serves, or is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request body's framing is malformed.
    #[error("the request body is malformed: {0}")]
    BadBody(&'static str),
    /// The client closed the connection in the middle of the request body.
    #[error("the client closed the connection before the request body was complete")]
    BodyTruncated,
    /// Reading the request body failed.
    #[error("reading the request body failed")]
    ReadBody(#[source] std::io::Error),
    /// No connection to the destination was made (refused or failed).
    #[error("no connection to the destination")]
    Egress(#[source] EgressError),
    /// Writing to the client failed.
    #[error("writing to the client failed")]
    WriteClient(#[source] std::io::Error),
    /// Writing the early data of a tunnel to the destination failed.
    #[error("writing to {destination} failed")]
    WriteUpstream {
        /// `host:port`.
        destination: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Copying through a tunnel failed.
    #[error("the tunnel to {destination} failed ({direction})")]
    Tunnel {
        /// `host:port`.
        destination: String,
        /// `"client to destination"` or `"destination to client"`.
        direction: &'static str,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange with the destination failed.
    #[error("the HTTP exchange with {destination} failed")]
    Upstream {
        /// `host:port`.
        destination: String,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The upstream request could not be built.
    #[error("cannot build the request to {destination}")]
    BuildRequest {
        /// `host:port`.
        destination: String,
        /// Why.
        #[source]
        source: http::Error,
    },
    /// The client went away before the response was relayed.
    #[error("the client closed the connection before the response was complete")]
    ClientGone,
}

/// The proxy's bounds; [`ProxyLimits::default`] is what [`EgressProxy::start`]
/// uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Longest wait for a complete request head.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_head_bytes: usize,
    /// Longest wait for name resolution and for each connection attempt.
    pub connect_timeout: Duration,
    /// Most client connections served at once; more are answered `503`.
    pub max_connections: usize,
    /// How long a tunnel stays open in one direction after the other
    /// direction has ended cleanly (TCP half-close).
    pub tunnel_linger: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_connections: 256,
            tunnel_linger: Duration::from_secs(60),
        }
    }
}

/// How many over-the-cap clients are answered `503` at once; beyond that they
/// are simply closed.
const MAX_BUSY_REPLIES: usize = 32;
/// How long closing a connection waits for the client's unread bytes, so that
/// the kernel does not answer them with a reset that destroys our reply.
const LINGER_ON_CLOSE: Duration = Duration::from_secs(1);
/// Longest chunk-size line or trailer line in a chunked request body.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailers after a chunked request body (discarded).
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Read size for request bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Pause after a failed `accept` (for example out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A running proxy for one session; dropping it (or [`EgressProxy::shutdown`])
/// stops accepting and closes live tunnels.
#[derive(Debug)]
pub struct EgressProxy {
    task: JoinHandle<()>,
    local_addr: SocketAddr,
}

impl EgressProxy {
    /// Starts serving on `listener` (a std listener, already bound and
    /// listening, possibly inside another network namespace) with the default
    /// [`ProxyLimits`]. Must be called within a tokio runtime.
    pub fn start(
        listener: std::net::TcpListener,
        policy: EgressPolicy,
    ) -> Result<Self, ProxyError> {
        Self::start_with_limits(listener, policy, ProxyLimits::default())
    }

    /// [`EgressProxy::start`] with explicit bounds.
    pub fn start_with_limits(
        listener: std::net::TcpListener,
        policy: EgressPolicy,
        limits: ProxyLimits,
    ) -> Result<Self, ProxyError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(ProxyError::NoRuntime)?;
        let local_addr = listener.local_addr().map_err(ProxyError::LocalAddr)?;
        listener
            .set_nonblocking(true)
            .map_err(ProxyError::NonBlocking)?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).map_err(ProxyError::Register)?
        };
        tracing::info!(%local_addr, "egress proxy started");
        let task = runtime.spawn(serve(listener, policy, limits));
        Ok(Self { task, local_addr })
    }

    /// The address the proxy listens on (in the namespace it was bound in).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every live connection and tunnel.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        // Aborting the accept task drops its listener and its JoinSet, which
        // aborts every connection task and so closes their sockets.
        self.task.abort();
        tracing::info!(local_addr = %self.local_addr, "egress proxy stopped");
    }
}

/// The environment a sandbox gets so that programs use the proxy at `addr`
/// (its address inside the sandbox): the upper- and lower-case `HTTP_PROXY`,
/// `HTTPS_PROXY` and `ALL_PROXY`, and `NO_PROXY` for the sandbox's own
/// loopback.
pub fn proxy_environment(addr: SocketAddr) -> Vec<(String, String)> {
    let url = format!("http://{addr}");
    let no_proxy = "localhost,127.0.0.1,::1";
    [
        ("HTTP_PROXY", url.as_str()),
        ("HTTPS_PROXY", url.as_str()),
        ("ALL_PROXY", url.as_str()),
        ("NO_PROXY", no_proxy),
        ("http_proxy", url.as_str()),
        ("https_proxy", url.as_str()),
        ("all_proxy", url.as_str()),
        ("no_proxy", no_proxy),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect()
}

async fn serve(listener: TcpListener, policy: EgressPolicy, limits: ProxyLimits) {
    let admission = Admission {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        busy_replies: Arc::new(Semaphore::new(MAX_BUSY_REPLIES)),
        policy: Arc::new(policy),
        limits,
    };
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => admission.admit(&mut tasks, stream, peer),
                Err(error) => {
                    tracing::warn!(%error, "egress proxy accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Decides what happens to an accepted connection: served while a slot is
/// free, answered `503` beyond the cap, or just closed when even the busy
/// replies are at their cap.
struct Admission {
    slots: Arc<Semaphore>,
    busy_replies: Arc<Semaphore>,
    policy: Arc<EgressPolicy>,
    limits: ProxyLimits,
}

impl Admission {
    fn admit(&self, tasks: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
        let limits = self.limits;
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            let policy = Arc::clone(&self.policy);
            tasks.spawn(async move {
                let _permit = permit;
                handle(stream, peer, &policy, &limits).await;
            });
        } else if let Ok(permit) = Arc::clone(&self.busy_replies).try_acquire_owned() {
            tracing::warn!(%peer, max = limits.max_connections, "egress proxy at its cap");
            let reason = format!(
                "the proxy is already serving its maximum of {} connections",
                limits.max_connections
            );
            tasks.spawn(async move {
                let _permit = permit;
                reply_and_close(stream, StatusCode::SERVICE_UNAVAILABLE, &reason).await;
            });
        }
        // Otherwise `stream` is dropped here, which closes it.
    }
}

async fn handle(stream: TcpStream, peer: SocketAddr, policy: &EgressPolicy, limits: &ProxyLimits) {
    // Latency matters more than packet count here; failing to set it is harmless.
    let _ = stream.set_nodelay(true);
    if let Err(error) = serve_client(stream, policy, limits).await {
        let error = chain(&error);
        tracing::debug!(%peer, %error, "egress proxy connection ended with an error");
    }
}

/// Serves one client connection: one request, then the connection closes.
async fn serve_client(
    mut client: TcpStream,
    policy: &EgressPolicy,
    limits: &ProxyLimits,
) -> Result<(), ProxyError> {
    let mut buf = BytesMut::with_capacity(4096);
    let read = read_head(&mut client, &mut buf, limits.max_head_bytes);
    let head_len = match tokio::time::timeout(limits.header_timeout, read).await {
        Err(_) => {
            let error = ProxyError::HeadTimeout(limits.header_timeout);
            reply_and_close(client, StatusCode::REQUEST_TIMEOUT, &error.to_string()).await;
            return Err(error);
        }
        // Connected and closed without a request: nothing to answer.
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(len))) => len,
        Ok(Err(error @ ProxyError::HeadTooLarge(_))) => {
            reply_and_close(client, StatusCode::BAD_REQUEST, &error.to_string()).await;
            return Err(error);
        }
        Ok(Err(error)) => return Err(error),
    };
    let head = buf.split_to(head_len);
    let request = match parse_request(&head) {
        Ok(request) => request,
        Err(error) => {
            reply_and_close(client, StatusCode::BAD_REQUEST, &error.to_string()).await;
            return Err(error);
        }
    };
    match request {
        ProxyRequest::Connect(target) => tunnel(client, buf, target, policy, limits).await,
        ProxyRequest::Forward(forward) => forward_http(client, buf, *forward, policy, limits).await,
    }
}

/// Reads until the end of the request head. `Ok(None)`: the client closed
/// before sending anything. Returns the head's length including its blank
/// line; bytes after it stay in `buf`.
async fn read_head(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<usize>, ProxyError> {
    let mut searched = 0;
    loop {
        if let Some(end) = find_head_end(buf, searched) {
            if end > max {
                return Err(ProxyError::HeadTooLarge(max));
            }
            return Ok(Some(end));
        }
        if buf.len() > max {
            return Err(ProxyError::HeadTooLarge(max));
        }
        searched = buf.len().saturating_sub(3);
        buf.reserve(4096);
        match client.read_buf(buf).await.map_err(ProxyError::ReadHead)? {
            0 if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) => return Ok(None),
            0 => return Err(ProxyError::HeadTruncated),
            _ => {}
        }
    }
}

/// The length of the head (through `\r\n\r\n`) if `buf` holds all of it,
/// searching from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| from + at + 4)
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// As written, lower-cased; IPv6 literals keep their brackets.
    host: String,
    port: u16,
}

impl Target {
    fn destination(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// A plain-HTTP request to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    method: Method,
    target: Target,
    /// The `Host` header to send: the URL's authority.
    authority: String,
    /// The origin-form request target: path and query.
    path: String,
    /// End-to-end headers only (no `Host`, framing, hop-by-hop, `Proxy-*`).
    headers: HeaderMap,
    framing: Framing,
    expect_continue: bool,
    /// The client's HTTP version, for the response framing.
    version: Version,
}

/// A request the proxy serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProxyRequest {
    Connect(Target),
    Forward(Box<Forward>),
}

/// The request line and headers, syntactically checked.
#[derive(Debug)]
struct Head {
    method: Method,
    target: String,
    version: Version,
    headers: HeaderMap,
}

fn bad(reason: impl Into<String>) -> ProxyError {
    ProxyError::BadRequest(reason.into())
}

/// Parses a request head (through its blank line) strictly: CRLF line ends,
/// no obsolete line folding, no whitespace before a header's colon.
fn parse_head(head: &[u8]) -> Result<Head, ProxyError> {
    // Robustness (RFC 9112 §2.2): empty lines before the request line.
    let mut rest = head;
    while let Some(after) = rest.strip_prefix(b"\r\n") {
        rest = after;
    }
    let mut lines = rest.split(|&b| b == b'\n').map(|line| {
        line.strip_suffix(b"\r")
            .ok_or_else(|| bad("request lines must end with CRLF"))
    });
    let request_line = lines.next().ok_or_else(|| bad("empty request"))??;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("the request line must be `METHOD target HTTP/1.1`"));
    };
    let method = Method::from_bytes(method).map_err(|_| bad("the request method is invalid"))?;
    let version = match version {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        _ => return Err(bad("only HTTP/1.0 and HTTP/1.1 requests are proxied")),
    };
    let target = std::str::from_utf8(target)
        .ok()
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| bad("the request target is invalid"))?
        .to_owned();
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line?;
        if line.is_empty() {
            break;
        }
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err(bad("obsolete header line folding is not accepted"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| bad("a header line has no colon"))?;
        let (name, value) = line.split_at(colon);
        let name = HeaderName::from_bytes(name).map_err(|_| {
            bad(format!(
                "invalid header name {:?}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let value = value[1..].trim_ascii();
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| bad(format!("invalid value for header {name}")))?;
        headers
            .try_append(name, value)
            .map_err(|_| bad("too many headers"))?;
    }
    Ok(Head {
        method,
        target,
        version,
        headers,
    })
}

/// Parses and classifies a request head: a `CONNECT` tunnel or an
/// absolute-form plain-HTTP request; anything else is a bad request.
fn parse_request(head: &[u8]) -> Result<ProxyRequest, ProxyError> {
    let head = parse_head(head)?;
    if head.method == Method::CONNECT {
        let target = parse_authority(&head.target, None)?;
        return Ok(ProxyRequest::Connect(target));
    }
    let uri: Uri = head
        .target
        .parse()
        .map_err(|_| bad("the request target is not a valid URL"))?;
    let Some(scheme) = uri.scheme_str() else {
        return Err(bad(
            "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port",
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(bad(format!(
            "only http:// URLs are forwarded; use CONNECT for {scheme}"
        )));
    }
    let authority = uri.authority().ok_or_else(|| bad("the URL has no host"))?;
    let target = parse_authority(authority.as_str(), Some(80))?;
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") => "/".to_owned(),
        Some(path) if path.starts_with('/') => path.to_owned(),
        Some(path) => format!("/{path}"),
    };
    let framing = framing(&head.headers, head.version)?;
    let expect_continue = match head.headers.get(header::EXPECT) {
        None => false,
        Some(value) if value.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Err(bad("the only supported expectation is 100-continue")),
    };
    Ok(ProxyRequest::Forward(Box::new(Forward {
        method: head.method,
        authority: authority.as_str().to_ascii_lowercase(),
        target,
        path,
        headers: end_to_end(&head.headers),
        framing,
        expect_continue,
        version: head.version,
    })))
}

/// Parses `host[:port]` (IPv6 literals in brackets); `default_port` is used
/// when the port is missing, and a missing port is an error without one.
fn parse_authority(text: &str, default_port: Option<u16>) -> Result<Target, ProxyError> {
    let invalid = || bad(format!("{text:?} is not a valid host:port"));
    let authority: http::uri::Authority = text.parse().map_err(|_| invalid())?;
    if authority.as_str().contains('@') {
        return Err(bad("user names in proxy targets are not accepted"));
    }
    let host = authority.host().to_ascii_lowercase();
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    if !host_ok {
        return Err(invalid());
    }
    let port = match (authority.port_u16(), default_port) {
        (Some(0), _) => return Err(bad("port 0 is not a destination")),
        (Some(port), _) | (None, Some(port)) => port,
        (None, None) => return Err(bad(format!("CONNECT needs host:port, got {text:?}"))),
    };
    Ok(Target { host, port })
}

/// The body framing of a request, refusing the ambiguous combinations that
/// allow request smuggling.
fn framing(headers: &HeaderMap, version: Version) -> Result<Framing, ProxyError> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() {
        if version == Version::HTTP_10 {
            return Err(bad("HTTP/1.0 requests cannot use Transfer-Encoding"));
        }
        if !lengths.is_empty() {
            return Err(bad(
                "a request cannot have both Transfer-Encoding and Content-Length",
            ));
        }
        return match te.as_slice() {
            [value]
                if value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked") =>
            {
                Ok(Framing::Chunked)
            }
            _ => Err(bad("the only supported Transfer-Encoding is chunked")),
        };
    }
    let mut length = None;
    for value in lengths {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            let parsed = std::str::from_utf8(item)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(bad("conflicting Content-Length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        None | Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// Whether a header is hop-by-hop (or for the proxy itself) and so never
/// forwarded, in either direction.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "host"
            | "content-length"
    ) || name.as_str().starts_with("proxy-")
}

/// `headers` without hop-by-hop headers, `Proxy-*` headers, the headers the
/// `Connection` header names, and the ones the proxy sets itself (`Host`,
/// framing, `Expect`).
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if !is_hop_by_hop(name) && !named.iter().any(|n| n == name.as_str()) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// The response head sent to the client: the upstream status and end-to-end
/// headers, `Connection: close`, and `Transfer-Encoding: chunked` when the
/// proxy re-chunks the body. `Content-Length` is kept as received.
fn response_head(
    status: StatusCode,
    reason: Option<&[u8]>,
    headers: &HeaderMap,
    chunked: bool,
) -> Vec<u8> {
    let reason = reason.unwrap_or_else(|| status.canonical_reason().unwrap_or("").as_bytes());
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(format!("HTTP/1.1 {} ", status.as_u16()).as_bytes());
    head.extend_from_slice(reason);
    head.extend_from_slice(b"\r\n");
    let length = headers.get(header::CONTENT_LENGTH);
    let mut kept = end_to_end(headers);
    if let Some(length) = length {
        kept.insert(header::CONTENT_LENGTH, length.clone());
    }
    for (name, value) in &kept {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    head
}

/// What [`BodyDecoder::decode`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
}

/// Incremental decoder of a request body's framing, so that exactly one
/// request is forwarded no matter what the client sends after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyDecoder {
    Length(u64),
    Chunked(Chunked),
    Done,
}

impl BodyDecoder {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::None => Self::Done,
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(Chunked::Size),
        }
    }

    /// Consumes what it can from `buf`: body data, or a request for more
    /// input, or the end of the body (what follows stays in `buf`).
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProxyError> {
        loop {
            match self {
                Self::Done => return Ok(Decoded::Done),
                Self::Length(0) => *self = Self::Done,
                Self::Length(remaining) | Self::Chunked(Chunked::Data(remaining)) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
                    *remaining -= n as u64;
                    if *self == Self::Chunked(Chunked::Data(0)) {
                        *self = Self::Chunked(Chunked::DataEnd);
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Self::Chunked(Chunked::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProxyError::BadBody("a chunk is not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Self::Chunked(Chunked::Size);
                }
                Self::Chunked(Chunked::Size) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    *self = match chunk_size(&line)? {
                        0 => Self::Chunked(Chunked::Trailers(0)),
                        size => Self::Chunked(Chunked::Data(size)),
                    };
                }
                Self::Chunked(Chunked::Trailers(seen)) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        *self = Self::Done;
                    } else {
                        *seen += line.len() + 2;
                        if *seen > MAX_TRAILER_BYTES {
                            return Err(ProxyError::BadBody("the trailers are too large"));
                        }
                    }
                }
            }
        }
    }
}

/// Takes one CRLF-terminated line off `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ProxyError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) if at <= MAX_CHUNK_LINE => {
            let line = buf.split_to(at);
            buf.advance(2);
            Ok(Some(line))
        }
        Some(_) => Err(ProxyError::BadBody("a chunk line is too long")),
        None if buf.len() > MAX_CHUNK_LINE => Err(ProxyError::BadBody("a chunk line is too long")),
        None => Ok(None),
    }
}

/// The size on a chunk-size line (`1a3f;ext=value`).
fn chunk_size(line: &[u8]) -> Result<u64, ProxyError> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(ProxyError::BadBody("invalid chunk size"));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or(ProxyError::BadBody("invalid chunk size"))
}

/// The status and one-line message for a connection that was not made.
fn egress_failure(error: &EgressError) -> (StatusCode, String) {
    let status = match error {
        EgressError::Refused { .. } => StatusCode::FORBIDDEN,
        EgressError::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        EgressError::Resolve { .. }
        | EgressError::NoAddresses { .. }
        | EgressError::Connect { .. } => StatusCode::BAD_GATEWAY,
    };
    (status, chain(error))
}

async fn tunnel(
    mut client: TcpStream,
    early: BytesMut,
    target: Target,
    policy: &EgressPolicy,
    limits: &ProxyLimits,
) -> Result<(), ProxyError> {
    let destination = target.destination();
    let mut upstream = match policy
        .connect(&target.host, target.port, limits.connect_timeout)
        .await
    {
        Ok(connection) => connection.stream,
        Err(error) => {
            let (status, message) = egress_failure(&error);
            reply_and_close(client, status, &message).await;
            return Err(ProxyError::Egress(error));
        }
    };
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .map_err(ProxyError::WriteClient)?;
    // Bytes the client sent right behind the CONNECT head (a TLS ClientHello,
    // say) belong to the tunnel.
    if !early.is_empty() {
        upstream
            .write_all(&early)
            .await
            .map_err(|source| ProxyError::WriteUpstream {
                destination: destination.clone(),
                source,
            })?;
    }
    relay(client, upstream, &destination, limits.tunnel_linger).await
}

/// Copies both ways. When one direction ends cleanly its end is passed on
/// (half-close) and the other direction gets `linger` to finish; an error in
/// either direction ends both.
async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    destination: &str,
    linger: Duration,
) -> Result<(), ProxyError> {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let up = async {
        let copied = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied
    };
    tokio::pin!(up, down);
    let fail = |direction| {
        move |source| ProxyError::Tunnel {
            destination: destination.to_owned(),
            direction,
            source,
        }
    };
    const UP: &str = "client to destination";
    const DOWN: &str = "destination to client";
    let rest = tokio::select! {
        copied = &mut up => {
            copied.map_err(fail(UP))?;
            tokio::time::timeout(linger, &mut down).await.map(|r| r.map_err(fail(DOWN)))
        }
        copied = &mut down => {
            copied.map_err(fail(DOWN))?;
            tokio::time::timeout(linger, &mut up).await.map(|r| r.map_err(fail(UP)))
        }
    };
    match rest {
        Ok(copied) => copied.map(|_| ()),
        // The linger ran out: close both.
        Err(_) => Ok(()),
    }
}

/// Aborts a spawned task when dropped, so that nothing outlives the
/// connection task that started it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type ProxyBody = UnsyncBoxBody<Bytes, ProxyError>;

/// The request body as a stream decoded from the client; once it is
/// complete, the read half goes back through `done` so that the caller can
/// notice the client leaving.
fn request_body(
    framing: Framing,
    buf: BytesMut,
    reader: OwnedReadHalf,
    done: oneshot::Sender<OwnedReadHalf>,
) -> ProxyBody {
    if framing == Framing::None {
        let _ = done.send(reader);
        return Empty::new().map_err(|never| match never {}).boxed_unsync();
    }
    let state = Some((BodyDecoder::new(framing), buf, reader, done));
    let frames = futures::stream::unfold(state, |state| async move {
        let (mut decoder, mut buf, mut reader, done) = state?;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(data)) => {
                    return Some((Ok(Frame::data(data)), Some((decoder, buf, reader, done))));
                }
                Ok(Decoded::Done) => {
                    let _ = done.send(reader);
                    return None;
                }
                Ok(Decoded::NeedMore) => {
                    buf.reserve(READ_CHUNK);
                    match reader.read_buf(&mut buf).await {
                        Ok(0) => return Some((Err(ProxyError::BodyTruncated), None)),
                        Ok(_) => {}
                        Err(source) => return Some((Err(ProxyError::ReadBody(source)), None)),
                    }
                }
                Err(error) => return Some((Err(error), None)),
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

/// Resolves when the client has closed its end (or failed) after sending
/// the whole request; bytes it sends after the request are discarded.
async fn client_gone(reader: oneshot::Receiver<OwnedReadHalf>) {
    let Ok(mut reader) = reader.await else {
        // The body was never completed; the exchange ends on its own.
        return std::future::pending().await;
    };
    let mut sink = [0_u8; 1024];
    while let Ok(1..) = reader.read(&mut sink).await {}
}

async fn forward_http(
    client: TcpStream,
    early: BytesMut,
    forward: Forward,
    policy: &EgressPolicy,
    limits: &ProxyLimits,
) -> Result<(), ProxyError> {
    let destination = forward.target.destination();
    let connection = match policy
        .connect(
            &forward.target.host,
            forward.target.port,
            limits.connect_timeout,
        )
        .await
    {
        Ok(connection) => connection,
        Err(error) => {
            let (status, message) = egress_failure(&error);
            reply_and_close(client, status, &message).await;
            return Err(ProxyError::Egress(error));
        }
    };
    let (reader, mut writer) = client.into_split();
    let upstream_error = |source| ProxyError::Upstream {
        destination: destination.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(connection.stream))
        .await
        .map_err(upstream_error)?;
    let _conn = AbortOnDrop(tokio::spawn(conn));

    let mut builder = Request::builder()
        .method(forward.method.clone())
        .uri(forward.path.as_str())
        .version(Version::HTTP_11)
        .header(header::HOST, forward.authority.as_str())
        .header(header::CONNECTION, "close");
    if let Some(headers) = builder.headers_mut() {
        headers.extend(forward.headers.clone());
    }
    builder = match forward.framing {
        Framing::None => builder,
        Framing::Length(n) => builder.header(header::CONTENT_LENGTH, n),
        Framing::Chunked => builder.header(header::TRANSFER_ENCODING, "chunked"),
    };
    if forward.expect_continue && forward.framing != Framing::None {
        writer
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(ProxyError::WriteClient)?;
    }
    let (done_tx, done_rx) = oneshot::channel();
    let body = request_body(forward.framing, early, reader, done_tx);
    let request = builder
        .body(body)
        .map_err(|source| ProxyError::BuildRequest {
            destination: destination.clone(),
            source,
        })?;
    let exchange = async {
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                // A malformed or truncated request body surfaces here too.
                let client_fault = error
                    .source()
                    .and_then(|s| s.downcast_ref::<ProxyError>())
                    .map(ProxyError::to_string);
                let (status, message) = match client_fault {
                    Some(reason) => (StatusCode::BAD_REQUEST, reason),
                    None => (
                        StatusCode::BAD_GATEWAY,
                        format!("the HTTP exchange with {destination} failed: {error}"),
                    ),
                };
                let _ = writer.write_all(&error_response(status, &message)).await;
                let _ = writer.shutdown().await;
                return Err(upstream_error(error));
            }
        };
        relay_response(&mut writer, response, &forward, &destination).await
    };
    tokio::select! {
        result = exchange => result,
        () = client_gone(done_rx) => Err(ProxyError::ClientGone),
    }
}

/// Writes the upstream response to the client and closes the connection.
async fn relay_response(
    writer: &mut OwnedWriteHalf,
    response: hyper::Response<hyper::body::Incoming>,
    forward: &Forward,
    destination: &str,
) -> Result<(), ProxyError> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless = forward.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // Without a length the body is re-chunked, so the client can tell a
    // complete body from a cut one; HTTP/1.0 clients get it close-delimited.
    let chunked = !bodiless
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
        && forward.version == Version::HTTP_11;
    let reason = parts
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| r.as_bytes());
    let head = response_head(status, reason, &parts.headers, chunked);
    writer
        .write_all(&head)
        .await
        .map_err(ProxyError::WriteClient)?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|source| ProxyError::Upstream {
            destination: destination.to_owned(),
            source,
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let mut chunk = Vec::with_capacity(data.len() + 20);
            chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            writer.write_all(&chunk).await
        } else {
            writer.write_all(&data).await
        }
        .map_err(ProxyError::WriteClient)?;
    }
    if chunked {
        writer
            .write_all(b"0\r\n\r\n")
            .await
            .map_err(ProxyError::WriteClient)?;
    }
    writer.shutdown().await.map_err(ProxyError::WriteClient)
}

/// A complete response from the proxy itself: a one-line plain-text body.
fn error_response(status: StatusCode, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

async fn reply(stream: &mut TcpStream, status: StatusCode, message: &str) -> std::io::Result<()> {
    stream.write_all(&error_response(status, message)).await
}

async fn reply_and_close(mut stream: TcpStream, status: StatusCode, message: &str) {
    if reply(&mut stream, status, message).await.is_ok() {
        close_gently(stream).await;
    }
}

/// Closes after a reply: sends FIN, then briefly drains what the client still
/// sends, since closing with unread data makes the kernel send a reset that
/// can destroy the reply before the client reads it.
async fn close_gently(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0_u8; 4096];
        while let Ok(1..) = stream.read(&mut sink).await {}
    };
    let _ = tokio::time::timeout(LINGER_ON_CLOSE, drain).await;
}

/// An error and its sources on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use harness_proto::sandbox::v1 as pb;
    use tokio::sync::mpsc;

    use super::*;
    use crate::network::allowlist::Allowlist;
    use crate::network::egress::EgressLog;
    use crate::network::resolver::Resolver;

    // ---- pure parsing ----

    fn forward_of(head: &str) -> Forward {
        match parse_request(head.as_bytes()).unwrap() {
            ProxyRequest::Forward(forward) => *forward,
            other => unreachable!("not a forward: {other:?}"),
        }
    }

    fn bad_request(head: &str) -> String {
        match parse_request(head.as_bytes()) {
            Err(ProxyError::BadRequest(reason)) => reason,
            other => unreachable!("{head:?} was not a bad request: {other:?}"),
        }
    }

    #[test]
    fn connect_targets_parse() {
        assert_eq!(
            parse_request(b"CONNECT API.Allowed.Test:443 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap(),
            ProxyRequest::Connect(Target {
                host: "api.allowed.test".to_owned(),
                port: 443
            })
        );
        assert_eq!(
            parse_request(b"\r\nCONNECT [::1]:8443 HTTP/1.0\r\n\r\n").unwrap(),
            ProxyRequest::Connect(Target {
                host: "[::1]".to_owned(),
                port: 8443
            })
        );
        assert_eq!(
            bad_request("CONNECT api.allowed.test HTTP/1.1\r\n\r\n"),
            "CONNECT needs host:port, got \"api.allowed.test\""
        );
        assert_eq!(
            bad_request("CONNECT user@api.allowed.test:443 HTTP/1.1\r\n\r\n"),
            "user names in proxy targets are not accepted"
        );
        assert_eq!(
            bad_request("CONNECT a.test:0 HTTP/1.1\r\n\r\n"),
            "port 0 is not a destination"
        );
        for target in ["http://a.test:443", "/", "a%41.test:443", "[::g]:443"] {
            bad_request(&format!("CONNECT {target} HTTP/1.1\r\n\r\n"));
        }
    }

    #[test]
    fn absolute_form_requests_become_origin_form() {
        let forward = forward_of(
            "GET http://API.allowed.test:8080/data?x=1 HTTP/1.1\r\n\
             Host: elsewhere.test\r\n\
             Proxy-Authorization: Basic c2VjcmV0\r\n\
             Proxy-Connection: keep-alive\r\n\
             Connection: keep-alive, X-Drop\r\n\
             X-Drop: 1\r\n\
             Keep-Alive: timeout=5\r\n\
             TE: trailers\r\n\
             Upgrade: websocket\r\n\
             Accept: */*\r\n\
             X-Custom:  spaced value \t\r\n\r\n",
        );
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("*/*"));
        headers.insert("x-custom", HeaderValue::from_static("spaced value"));
        assert_eq!(
            forward,
            Forward {
                method: Method::GET,
                target: Target {
                    host: "api.allowed.test".to_owned(),
                    port: 8080
                },
                authority: "api.allowed.test:8080".to_owned(),
                path: "/data?x=1".to_owned(),
                headers,
                framing: Framing::None,
                expect_continue: false,
                version: Version::HTTP_11,
            }
        );
        let bare = forward_of("HEAD http://a.test HTTP/1.0\r\n\r\n");
        assert_eq!(
            (bare.target.port, bare.path.as_str(), bare.version),
            (80, "/", Version::HTTP_10)
        );
    }

    #[test]
    fn request_body_framing_is_unambiguous() {
        let post = |headers: &str| {
            parse_request(format!("POST http://a.test/ HTTP/1.1\r\n{headers}\r\n").as_bytes()).map(
                |r| match r {
                    ProxyRequest::Forward(f) => (f.framing, f.expect_continue),
                    ProxyRequest::Connect(_) => unreachable!(),
                },
            )
        };
        assert_eq!(post("").unwrap(), (Framing::None, false));
        assert_eq!(
            post("Content-Length: 12\r\nExpect: 100-Continue\r\n").unwrap(),
            (Framing::Length(12), true)
        );
        assert_eq!(
            post("Content-Length: 12, 12\r\n").unwrap(),
            (Framing::Length(12), false)
        );
        assert_eq!(
            post("Transfer-Encoding: Chunked\r\n").unwrap(),
            (Framing::Chunked, false)
        );
        for headers in [
            "Content-Length: 12\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 12\r\nContent-Length: 13\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +12\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Expect: magic\r\n",
        ] {
            assert!(
                matches!(post(headers), Err(ProxyError::BadRequest(_))),
                "{headers:?} was accepted"
            );
        }
        assert_eq!(
            bad_request("POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            "HTTP/1.0 requests cannot use Transfer-Encoding"
        );
    }

    #[test]
    fn malformed_heads_are_rejected() {
        assert_eq!(
            bad_request("GET /path HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port"
        );
        assert_eq!(
            bad_request("GET https://a.test/ HTTP/1.1\r\n\r\n"),
            "only http:// URLs are forwarded; use CONNECT for https"
        );
        for head in [
            "garbage\r\n\r\n",
            "GET http://a.test/ HTTP/2.0\r\n\r\n",
            "GET  http://a.test/ HTTP/1.1\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\nHost: a\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nX-A : 1\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nno colon\r\n\r\n",
            "GET http://a.test/ HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
            "GET http://user:pw@a.test/ HTTP/1.1\r\n\r\n",
            "GET http://a b/ HTTP/1.1\r\n\r\n",
            "G(T http://a.test/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET a.test:80 HTTP/1.1\r\n\r\n",
        ] {
            bad_request(head);
        }
    }

    #[test]
    fn head_end_is_found_across_reads() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0), Some(18));
        // read_head searches from three bytes before the old end.
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n", 14), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n", 0), None);
        assert_eq!(find_head_end(b"ab", 5), None);
    }

    fn decode_all(framing: Framing, pieces: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>), ProxyError> {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = pieces.iter();
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Done => return Ok((body, buf.to_vec())),
                Decoded::NeedMore => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => return Err(ProxyError::BodyTruncated),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_byte_by_byte() {
        let encoded = b"5;name=value\r\nhello\r\n7 \r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        // Fed a byte at a time, it stops asking once the body is complete.
        let bytewise: Vec<&[u8]> = encoded.chunks(1).collect();
        assert_eq!(
            decode_all(Framing::Chunked, &bytewise).unwrap(),
            (b"hello, world".to_vec(), Vec::new())
        );
        assert_eq!(
            decode_all(Framing::Chunked, &[encoded]).unwrap(),
            (b"hello, world".to_vec(), b"NEXT".to_vec())
        );
        assert_eq!(
            decode_all(Framing::Length(5), &[b"hel", b"loEXTRA"]).unwrap(),
            (b"hello".to_vec(), b"EXTRA".to_vec())
        );
        assert_eq!(
            decode_all(Framing::None, &[]).unwrap(),
            (Vec::new(), Vec::new())
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        let long_line = format!("{}\r\n", "0".repeat(MAX_CHUNK_LINE + 1));
        for encoded in [
            &b"g\r\n"[..],
            b"\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11112222333344445\r\n",
            long_line.as_bytes(),
        ] {
            assert!(
                matches!(
                    decode_all(Framing::Chunked, &[encoded]),
                    Err(ProxyError::BadBody(_))
                ),
                "{:?} was accepted",
                String::from_utf8_lossy(encoded)
            );
        }
        assert!(matches!(
            decode_all(Framing::Chunked, &[b"5\r\nhel"]),
            Err(ProxyError::BodyTruncated)
        ));
    }

    #[test]
    fn response_heads_drop_hop_by_hop_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        assert_eq!(
            String::from_utf8(response_head(StatusCode::OK, None, &headers, true)).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let mut sized = HeaderMap::new();
        sized.insert("content-length", HeaderValue::from_static("5"));
        assert_eq!(
            String::from_utf8(response_head(
                StatusCode::NOT_FOUND,
                Some(b"Nope"),
                &sized,
                false
            ))
            .unwrap(),
            "HTTP/1.1 404 Nope\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn the_environment_points_every_client_at_the_proxy() {
        let env = proxy_environment("127.0.0.1:3128".parse().unwrap());
        let expected: Vec<(String, String)> = [
            ("HTTP_PROXY", "http://127.0.0.1:3128"),
            ("HTTPS_PROXY", "http://127.0.0.1:3128"),
            ("ALL_PROXY", "http://127.0.0.1:3128"),
            ("NO_PROXY", "localhost,127.0.0.1,::1"),
            ("http_proxy", "http://127.0.0.1:3128"),
            ("https_proxy", "http://127.0.0.1:3128"),
            ("all_proxy", "http://127.0.0.1:3128"),
            ("no_proxy", "localhost,127.0.0.1,::1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, expected);
        assert_eq!(
            proxy_environment("[::1]:3128".parse().unwrap())[0].1,
            "http://[::1]:3128"
        );
    }

    // ---- the proxy on loopback ----

    /// An echo server counting its connections.
    async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (address, accepted)
    }

    /// What the upstream HTTP server received: the head and the decoded body.
    type Received = (String, Vec<u8>);

    /// An HTTP server answering each request with "you sent N bytes: BODY"
    /// (chunked when the path is `/chunked`), reporting what it received.
    async fn http_server() -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    let Ok(Some(len)) = read_head(&mut stream, &mut buf, 1 << 20).await else {
                        return;
                    };
                    let head_bytes = buf.split_to(len);
                    let head = parse_head(&head_bytes).unwrap();
                    let mut decoder =
                        BodyDecoder::new(framing(&head.headers, head.version).unwrap());
                    let mut body = Vec::new();
                    loop {
                        match decoder.decode(&mut buf).unwrap() {
                            Decoded::Data(data) => body.extend_from_slice(&data),
                            Decoded::Done => break,
                            Decoded::NeedMore => {
                                if stream.read_buf(&mut buf).await.unwrap() == 0 {
                                    return;
                                }
                            }
                        }
                    }
                    let text = format!(
                        "you sent {} bytes: {}",
                        body.len(),
                        String::from_utf8_lossy(&body)
                    );
                    let response = if head.target == "/chunked" {
                        format!(
                            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{text}\r\n0\r\n\r\n",
                            text.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                            text.len()
                        )
                    };
                    let _ = tx.send((String::from_utf8_lossy(&head_bytes).into_owned(), body));
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (address, rx)
    }

    fn egress_policy(allow: &[String], cidrs: &[&str], hosts: &[(&str, &str)]) -> EgressPolicy {
        let allowlist = Allowlist::from_policy(&pb::NetworkPolicy {
            allow: allow.to_vec(),
            deny: vec![],
            allow_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        })
        .unwrap();
        let hosts: BTreeMap<String, Vec<IpAddr>> = hosts
            .iter()
            .map(|(name, ip)| (name.to_string(), vec![ip.parse().unwrap()]))
            .collect();
        EgressPolicy {
            allowlist: Arc::new(allowlist),
            resolver: Resolver::new(hosts),
            log: Arc::new(EgressLog::default()),
        }
    }

    /// The names the tests use, all answered by the static-hosts map.
    const HOSTS: &[(&str, &str)] = &[
        ("api.allowed.test", "127.0.0.1"),
        ("allowed.test", "127.0.0.1"),
        ("evil-allowed.test", "127.0.0.1"),
        ("meta.allowed.test", "169.254.169.254"),
    ];

    fn start(policy: &EgressPolicy, limits: ProxyLimits) -> EgressProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        EgressProxy::start_with_limits(listener, policy.clone(), limits).unwrap()
    }

    /// Sends `request` and reads the whole answer (the proxy closes after one).
    async fn exchange(proxy: &EgressProxy, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the proxy did not close the connection")
            .unwrap();
        String::from_utf8(answer).unwrap()
    }

    /// The log without timestamps, for whole-value asserts.
    fn decisions(policy: &EgressPolicy) -> Vec<(String, Option<SocketAddr>, bool, String)> {
        policy
            .log
            .records()
            .into_iter()
            .map(|r| (r.destination, r.address, r.allowed, r.detail))
            .collect()
    }

    fn forbidden(reason: &str) -> String {
        String::from_utf8(error_response(StatusCode::FORBIDDEN, reason)).unwrap()
    }

    #[tokio::test]
    async fn connect_tunnels_reach_an_allowed_host() {
        let (echo, _) = echo_server().await;
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        // The first tunnel bytes ride along with the CONNECT head.
        let request = format!(
            "CONNECT api.allowed.test:{} HTTP/1.1\r\nHost: api.allowed.test\r\n\r\nearly ",
            echo.port()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let established = b"HTTP/1.1 200 Connection Established\r\n\r\n";
        let mut answer = vec![0_u8; established.len() + b"early ".len()];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [&established[..], b"early "].concat());
        stream.write_all(b"ping through the tunnel").await.unwrap();
        let mut echoed = vec![0_u8; b"ping through the tunnel".len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, b"ping through the tunnel");
        // Half-close from the client ends the tunnel once the echo side ends.
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            decisions(&policy),
            vec![(
                format!("api.allowed.test:{}", echo.port()),
                Some(echo),
                true,
                "*.allowed.test".to_owned()
            )]
        );
    }

    #[tokio::test]
    async fn plain_http_is_forwarded_in_origin_form() {
        let (server, mut received) = http_server().await;
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let port = server.port();
        let answer = exchange(
            &proxy,
            format!(
                "GET http://api.allowed.test:{port}/data?x=1 HTTP/1.1\r\n\
                 Host: other.test\r\n\
                 Proxy-Authorization: Basic c2VjcmV0\r\n\
                 Proxy-Connection: keep-alive\r\n\
                 Connection: keep-alive, X-Drop\r\n\
                 X-Drop: 1\r\n\
                 X-Custom: kept\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(
            answer,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 18\r\nconnection: close\r\n\r\nyou sent 0 bytes: "
        );
        let (head, body) = received.recv().await.unwrap();
        assert_eq!(
            head,
            format!(
                "GET /data?x=1 HTTP/1.1\r\nhost: api.allowed.test:{port}\r\nconnection: close\r\nx-custom: kept\r\n\r\n"
            )
        );
        assert!(body.is_empty());
        assert_eq!(
            decisions(&policy),
            vec![(
                format!("api.allowed.test:{port}"),
                Some(server),
                true,
                "*.allowed.test".to_owned()
            )]
        );
    }

    #[tokio::test]
    async fn request_bodies_are_forwarded_and_responses_rechunked() {
        let (server, mut received) = http_server().await;
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let port = server.port();
        // Content-Length, with a pipelined second request that must not reach
        // the server.
        let answer = exchange(
            &proxy,
            format!(
                "POST http://api.allowed.test:{port}/upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
                 GET /smuggled HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(
            answer.ends_with("\r\n\r\nyou sent 5 bytes: hello"),
            "{answer}"
        );
        let (head, body) = received.recv().await.unwrap();
        assert!(head.starts_with("POST /upload HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("content-length: 5\r\n"), "{head}");
        assert_eq!(body, b"hello");
        // Chunked, with Expect: 100-continue, to a chunked response.
        let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        stream
            .write_all(
                format!(
                    "POST http://api.allowed.test:{port}/chunked HTTP/1.1\r\n\
                     Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut cont = vec![0_u8; b"HTTP/1.1 100 Continue\r\n\r\n".len()];
        stream.read_exact(&mut cont).await.unwrap();
        assert_eq!(cont, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream
            .write_all(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, chunked) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close"
        );
        let (decoded, rest) = decode_all(Framing::Chunked, &[chunked.as_bytes()]).unwrap();
        assert_eq!(decoded, b"you sent 7 bytes: abcdefg");
        assert!(rest.is_empty());
        let (head, body) = received.recv().await.unwrap();
        assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
        assert!(!head.to_lowercase().contains("expect"), "{head}");
        assert_eq!(body, b"abcdefg");
        // Exactly the two requests arrived: the pipelined one was dropped.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(received.try_recv().is_err());
        assert_eq!(policy.log.records().len(), 2);
    }

    #[tokio::test]
    async fn malformed_request_bodies_get_400() {
        let (server, _received) = http_server().await;
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let answer = exchange(
            &proxy,
            format!(
                "POST http://api.allowed.test:{}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                server.port()
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(
            answer,
            String::from_utf8(error_response(
                StatusCode::BAD_REQUEST,
                "the request body is malformed: invalid chunk size"
            ))
            .unwrap()
        );
    }

    #[tokio::test]
    async fn destinations_off_the_allowlist_are_refused_with_403() {
        let (echo, accepted) = echo_server().await;
        let port = echo.port();
        let allow = vec![format!("*.allowed.test:{port}")];
        let policy = egress_policy(&allow, &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let other = port.wrapping_add(1).max(1);
        let cases = [
            (
                format!("CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n"),
                format!("allowed.test:{port}"),
                format!("host allowed.test port {port} is not on the allowlist"),
            ),
            (
                format!("CONNECT evil-allowed.test:{port} HTTP/1.1\r\n\r\n"),
                format!("evil-allowed.test:{port}"),
                format!("host evil-allowed.test port {port} is not on the allowlist"),
            ),
            (
                format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n"),
                format!("127.0.0.1:{port}"),
                format!(
                    "IP address 127.0.0.1 port {port} is not on the allowlist (IP literals need a rule naming them)"
                ),
            ),
            (
                format!("CONNECT api.allowed.test:{other} HTTP/1.1\r\n\r\n"),
                format!("api.allowed.test:{other}"),
                format!("host api.allowed.test port {other} is not on the allowlist"),
            ),
            (
                format!("GET http://evil.test:{port}/ HTTP/1.1\r\n\r\n"),
                format!("evil.test:{port}"),
                format!("host evil.test port {port} is not on the allowlist"),
            ),
        ];
        for (request, _, reason) in &cases {
            assert_eq!(
                exchange(&proxy, request.as_bytes()).await,
                forbidden(reason),
                "{request}"
            );
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "a refused request reached the server"
        );
        let expected: Vec<_> = cases
            .iter()
            .map(|(_, destination, reason)| (destination.clone(), None, false, reason.clone()))
            .collect();
        assert_eq!(decisions(&policy), expected);
    }

    #[tokio::test]
    async fn special_range_answers_are_refused_without_a_cidr_grant() {
        let (echo, accepted) = echo_server().await;
        let port = echo.port();
        let policy = egress_policy(&["*.allowed.test".to_owned()], &[], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let loopback = "api.allowed.test resolves to 127.0.0.1, a loopback (127.0.0.0/8) address, \
                        and no granted CIDR covers it";
        let metadata = "meta.allowed.test resolves to 169.254.169.254, a link-local / cloud metadata \
                        (169.254.0.0/16) address, and no granted CIDR covers it";
        assert_eq!(
            exchange(
                &proxy,
                format!("CONNECT api.allowed.test:{port} HTTP/1.1\r\n\r\n").as_bytes()
            )
            .await,
            forbidden(loopback)
        );
        // Refused before any connection is attempted: nothing leaves the host.
        assert_eq!(
            exchange(
                &proxy,
                b"GET http://meta.allowed.test/latest/meta-data/ HTTP/1.1\r\n\r\n"
            )
            .await,
            forbidden(metadata)
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
        assert_eq!(
            decisions(&policy),
            vec![
                (
                    format!("api.allowed.test:{port}"),
                    Some(echo),
                    false,
                    loopback.to_owned()
                ),
                (
                    "meta.allowed.test:80".to_owned(),
                    Some("169.254.169.254:80".parse().unwrap()),
                    false,
                    metadata.to_owned()
                ),
            ]
        );
    }

    #[tokio::test]
    async fn malformed_requests_get_400_and_no_decision() {
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let huge = format!(
            "GET http://api.allowed.test/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let cases = [
            (
                "GET /path HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n".to_owned(),
                "this is a proxy: send an absolute URL (GET http://host/path) or CONNECT host:port",
            ),
            (
                "garbage\r\n\r\n".to_owned(),
                "the request line must be `METHOD target HTTP/1.1`",
            ),
            (
                "CONNECT api.allowed.test HTTP/1.1\r\n\r\n".to_owned(),
                "CONNECT needs host:port, got \"api.allowed.test\"",
            ),
            (huge, "the request head is larger than 65536 bytes"),
        ];
        for (request, reason) in &cases {
            let answer = exchange(&proxy, request.as_bytes()).await;
            assert_eq!(
                answer,
                String::from_utf8(error_response(StatusCode::BAD_REQUEST, reason)).unwrap()
            );
        }
        assert_eq!(decisions(&policy), vec![]);
    }

    #[tokio::test]
    async fn idle_clients_time_out_and_the_connection_cap_holds() {
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let limits = ProxyLimits {
            header_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..ProxyLimits::default()
        };
        let proxy = start(&policy, limits);
        // The first client sends half a head and holds the only slot.
        let mut idle = TcpStream::connect(proxy.local_addr()).await.unwrap();
        idle.write_all(b"GET http://api.allowed.test/ HTTP/1.1\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy = exchange(&proxy, b"GET http://api.allowed.test/ HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            busy,
            String::from_utf8(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is already serving its maximum of 1 connections"
            ))
            .unwrap()
        );
        let mut answer = Vec::new();
        idle.read_to_end(&mut answer).await.unwrap();
        assert_eq!(
            String::from_utf8(answer).unwrap(),
            String::from_utf8(error_response(
                StatusCode::REQUEST_TIMEOUT,
                "no complete request head within 300ms"
            ))
            .unwrap()
        );
        assert_eq!(decisions(&policy), vec![]);
    }

    #[tokio::test]
    async fn shutdown_closes_live_tunnels_and_stops_accepting() {
        let (echo, _) = echo_server().await;
        let policy = egress_policy(&["*.allowed.test".to_owned()], &["127.0.0.0/8"], HOSTS);
        let proxy = start(&policy, ProxyLimits::default());
        let address = proxy.local_addr();
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(
                format!("CONNECT api.allowed.test:{} HTTP/1.1\r\n\r\n", echo.port()).as_bytes(),
            )
            .await
            .unwrap();
        let mut established = vec![0_u8; b"HTTP/1.1 200 Connection Established\r\n\r\n".len()];
        stream.read_exact(&mut established).await.unwrap();
        proxy.shutdown();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("the tunnel stayed open after shutdown");
        assert!(closed.is_err() || rest.is_empty());
        // The listener is gone too.
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(address).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the proxy still accepts after shutdown");
    }

    #[test]
    fn starting_outside_a_runtime_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let policy = egress_policy(&[], &[], &[]);
        assert!(matches!(
            EgressProxy::start(listener, policy),
            Err(ProxyError::NoRuntime(_))
        ));
    }
}
