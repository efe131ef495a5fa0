//! The `wasi:http` outgoing-request hook: every request a WASI tool makes
//! passes the session's allowlist, is resolved by sandboxd itself, has its
//! addresses checked against the special ranges, and is sent to exactly the
//! address that was checked. The checking and connecting is
//! [`EgressPolicy::connect`] ([`super::egress`]), shared with the process
//! backend's proxy; this module adds the HTTP (and TLS) exchange.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Request;
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::egress::{EgressConnection, EgressError};
pub use super::egress::{EgressLog, EgressPolicy, EgressRecord};

/// Longest wait for a connection when the guest does not set one.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The hooks installed in every WASI store. `None` means no network at all.
#[derive(Debug, Clone, Default)]
pub struct EgressHooks {
    policy: Option<EgressPolicy>,
}

impl EgressHooks {
    /// Hooks enforcing `policy`.
    pub fn new(policy: Option<EgressPolicy>) -> Self {
        Self { policy }
    }
}

type SendResult = Result<
    (
        hyper::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        drop(fut);
        let policy = self.policy.clone();
        Box::new(async move {
            let Some(policy) = policy else {
                return Err(HttpError::HttpRequestDenied);
            };
            send_checked(&policy, request, options).await
        })
    }
}

/// Where a request wants to go.
struct Target {
    host: String,
    port: u16,
    tls: bool,
}

fn target_of(request: &Request<WasiBody>) -> Result<Target, HttpError> {
    let uri = request.uri();
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(HttpError::HttpProtocolError),
    };
    let authority = uri.authority().ok_or(HttpError::HttpRequestUriInvalid)?;
    Ok(Target {
        host: authority.host().to_owned(),
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        tls,
    })
}

async fn send_checked(
    policy: &EgressPolicy,
    mut request: Request<WasiBody>,
    options: Option<RequestOptions>,
) -> SendResult {
    let target = target_of(&request)?;
    let connect_timeout = options
        .and_then(|o| o.connect_timeout)
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let EgressConnection { stream, .. } = policy
        .connect(&target.host, target.port, connect_timeout)
        .await
        .map_err(http_error)?;
    // The request line carries only the path; the Host header was already set
    // from the authority by wasmtime-wasi-http.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let first_byte_timeout = options.and_then(|o| o.first_byte_timeout);
    if target.tls {
        let tls = tls_connect(&target.host, stream).await?;
        exchange(
            TokioIo::new(tls),
            request,
            connect_timeout,
            first_byte_timeout,
        )
        .await
    } else {
        exchange(
            TokioIo::new(stream),
            request,
            connect_timeout,
            first_byte_timeout,
        )
        .await
    }
}

/// The `wasi:http` error code a guest sees for a connection not made.
fn http_error(error: EgressError) -> HttpError {
    match error {
        EgressError::Refused { .. } => HttpError::HttpRequestDenied,
        EgressError::Resolve { .. } | EgressError::NoAddresses { .. } => HttpError::DnsError {
            rcode: Some("NXDOMAIN".to_owned()),
            info_code: None,
        },
        EgressError::Connect { source, .. } => HttpError::Connect(source),
        EgressError::ConnectTimeout { .. } => HttpError::ConnectionTimeout,
    }
}

async fn tls_connect(
    host: &str,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(super::allowlist::normalize_host(host))
        .map_err(|_| HttpError::HttpRequestUriInvalid)?;
    connector
        .connect(name, stream)
        .await
        .map_err(HttpError::Tls)
}

async fn exchange<IO>(
    io: IO,
    request: Request<WasiBody>,
    connect_timeout: Duration,
    first_byte_timeout: Option<Duration>,
) -> SendResult
where
    IO: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) =
        tokio::time::timeout(connect_timeout, hyper::client::conn::http1::handshake(io))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // The connection task drives I/O for the response body after we return;
    // its outcome is reported through the io future wasmtime-wasi-http awaits.
    tokio::spawn(async move {
        let _ = done_tx.send(connection.await.map_err(HttpError::from));
    });
    let send = sender.send_request(request);
    let response = match first_byte_timeout {
        Some(limit) => tokio::time::timeout(limit, send)
            .await
            .map_err(|_| HttpError::ConnectionReadTimeout)??,
        None => send.await?,
    };
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    let io: Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>> =
        Box::pin(async move { done_rx.await.unwrap_or(Ok(())) });
    Ok((response, Box::new(io)))
}
