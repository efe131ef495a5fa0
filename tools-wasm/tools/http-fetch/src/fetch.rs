//! Sending the request through `wasi:http/outgoing-handler` and reading the response.
//!
//! wasi:http resources have parent/child rules (a pollable before the future it watches, a
//! stream before the body it reads): dropping a parent first traps. Locals are declared
//! parent first so Rust drops children first; where that is not enough, drops are explicit.

use std::collections::BTreeMap;

use harness_tool_sdk::ToolError;
use wasip2::clocks::monotonic_clock;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, FutureIncomingResponse, HeaderError, IncomingResponse, Method as WasiMethod,
    OutgoingBody, OutgoingRequest, RequestOptions, Scheme as WasiScheme,
};
use wasip2::io::poll::{Pollable, poll};
use wasip2::io::streams::{InputStream, OutputStream, StreamError};

use crate::url::Scheme;
use crate::{Method, Output, Request, body_text};

/// How much to ask a stream for at once.
const CHUNK: u64 = 64 * 1024;

/// Sends `request` and reads the response, within `request.timeout_ms`.
pub(crate) fn fetch(request: &Request) -> Result<Output, ToolError> {
    let deadline = Deadline::new(request.timeout_ms);
    let host = request.target.host.as_str();

    let headers = header_fields(&request.headers)?;
    let outgoing = OutgoingRequest::new(headers);
    let method = match request.method {
        Method::Get => WasiMethod::Get,
        Method::Post => WasiMethod::Post,
    };
    let scheme = match request.target.scheme {
        Scheme::Http => WasiScheme::Http,
        Scheme::Https => WasiScheme::Https,
    };
    let refused = |what: &str| {
        ToolError::invalid_input(format!(
            "the runtime refused the request's {what} for `{}`",
            request.target.authority
        ))
    };
    outgoing
        .set_method(&method)
        .map_err(|()| refused("method"))?;
    outgoing
        .set_scheme(Some(&scheme))
        .map_err(|()| refused("scheme"))?;
    outgoing
        .set_authority(Some(&request.target.authority))
        .map_err(|()| refused("host"))?;
    outgoing
        .set_path_with_query(Some(&request.target.path_with_query))
        .map_err(|()| refused("path"))?;
    // The body handle must be taken before `handle` consumes the request; a GET takes none,
    // so it is sent without a body at all.
    let body = match request.body {
        Some(_) => Some(
            outgoing
                .body()
                .map_err(|()| ToolError::failed("wasi:http gave no request body"))?,
        ),
        None => None,
    };

    let options = RequestOptions::new();
    let timeout_ns = request.timeout_ms.saturating_mul(1_000_000);
    // A host may not support some of these; the deadline below still bounds the call.
    let _ = options.set_connect_timeout(Some(timeout_ns));
    let _ = options.set_first_byte_timeout(Some(timeout_ns));
    let _ = options.set_between_bytes_timeout(Some(timeout_ns));

    let pending = outgoing_handler::handle(outgoing, Some(options))
        .map_err(|code| error_for(&code, host, request.timeout_ms))?;

    if let (Some(body), Some(text)) = (body, &request.body) {
        let written = write_body(&body, text.as_bytes(), &deadline);
        let finished = written.and_then(|()| {
            OutgoingBody::finish(body, None)
                .map_err(|code| error_for(&code, host, request.timeout_ms))
        });
        if let Err(err) = finished {
            // A refused or failed request also breaks the body stream; the response says
            // why, so report that when it is already known.
            if let Some(Ok(Err(code))) = pending.get() {
                return Err(error_for(&code, host, request.timeout_ms));
            }
            return Err(err);
        }
    }

    let response = wait_response(&pending, &deadline, host, request.timeout_ms)?;
    drop(pending);
    read_response(response, request, &deadline)
}

fn header_fields(headers: &[(String, String)]) -> Result<Fields, ToolError> {
    let entries: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(name, value)| (name.clone(), value.clone().into_bytes()))
        .collect();
    Fields::from_list(&entries).map_err(|err| {
        // `from_list` does not say which header it refused; find it so the message can.
        let culprit = headers
            .iter()
            .find(|(name, value)| {
                Fields::from_list(&[(name.clone(), value.clone().into_bytes())]).is_err()
            })
            .map_or("?", |(name, _)| name.as_str());
        match err {
            HeaderError::Forbidden => ToolError::invalid_input(format!(
                "header `{culprit}` cannot be set by a tool; the runtime manages it"
            )),
            HeaderError::InvalidSyntax | HeaderError::Immutable => {
                ToolError::invalid_input(format!("header `{culprit}` is not valid HTTP"))
            }
        }
    })
}

/// The end of the call's time budget.
struct Deadline {
    at: monotonic_clock::Instant,
}

impl Deadline {
    fn new(timeout_ms: u64) -> Self {
        Self {
            at: monotonic_clock::now().saturating_add(timeout_ms.saturating_mul(1_000_000)),
        }
    }

    /// Blocks until `ready` is ready (true) or the deadline passes (false).
    fn wait(&self, ready: &Pollable) -> bool {
        if ready.ready() {
            return true;
        }
        let timer = monotonic_clock::subscribe_instant(self.at);
        loop {
            let woken = poll(&[ready, &timer]);
            if woken.contains(&0) {
                return true;
            }
            if woken.contains(&1) {
                return false;
            }
        }
    }
}

fn write_body(body: &OutgoingBody, bytes: &[u8], deadline: &Deadline) -> Result<(), ToolError> {
    let stream: OutputStream = body
        .write()
        .map_err(|()| ToolError::failed("wasi:http gave no request body stream"))?;
    let broken = |err: StreamError| match err {
        StreamError::Closed => ToolError::failed("the connection closed while sending the body"),
        StreamError::LastOperationFailed(err) => ToolError::failed(format!(
            "sending the request body failed: {}",
            err.to_debug_string()
        )),
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        let room = stream.check_write().map_err(broken)?;
        if room == 0 {
            let ready = stream.subscribe();
            if !deadline.wait(&ready) {
                return Err(ToolError::failed(
                    "timed out while sending the request body",
                ));
            }
            continue;
        }
        let take = rest.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let (now, later) = rest.split_at(take);
        stream.write(now).map_err(broken)?;
        rest = later;
    }
    stream.flush().map_err(broken)?;
    loop {
        // `check_write` fails once a flush failed and reports room again once it is done.
        if stream.check_write().map_err(broken)? > 0 {
            break;
        }
        let ready = stream.subscribe();
        if !deadline.wait(&ready) {
            return Err(ToolError::failed(
                "timed out while sending the request body",
            ));
        }
    }
    Ok(())
}

fn wait_response(
    pending: &FutureIncomingResponse,
    deadline: &Deadline,
    host: &str,
    timeout_ms: u64,
) -> Result<IncomingResponse, ToolError> {
    loop {
        match pending.get() {
            Some(Ok(Ok(response))) => return Ok(response),
            Some(Ok(Err(code))) => return Err(error_for(&code, host, timeout_ms)),
            Some(Err(())) => {
                return Err(ToolError::failed("wasi:http returned the response twice"));
            }
            None => {
                let ready = pending.subscribe();
                if !deadline.wait(&ready) {
                    return Err(timed_out(host, timeout_ms, "waiting for the response"));
                }
            }
        }
    }
}

fn read_response(
    response: IncomingResponse,
    request: &Request,
    deadline: &Deadline,
) -> Result<Output, ToolError> {
    let host = request.target.host.as_str();
    let status = response.status();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in response.headers().entries() {
        let value = String::from_utf8_lossy(&value).into_owned();
        headers
            .entry(name.to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }

    let body = response
        .consume()
        .map_err(|()| ToolError::failed("wasi:http gave no response body"))?;
    let stream: InputStream = body
        .stream()
        .map_err(|()| ToolError::failed("wasi:http gave no response body stream"))?;
    // Read one byte past the limit to know whether the body was longer.
    let wanted = request.max_bytes.saturating_add(1);
    let mut bytes: Vec<u8> = Vec::new();
    loop {
        let have = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if have >= wanted {
            break;
        }
        match stream.read(CHUNK.min(wanted - have)) {
            Ok(chunk) if chunk.is_empty() => {
                let ready = stream.subscribe();
                if !deadline.wait(&ready) {
                    return Err(timed_out(
                        host,
                        request.timeout_ms,
                        "reading the response body",
                    ));
                }
            }
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(err)) => {
                return Err(match wasip2::http::types::http_error_code(&err) {
                    Some(code) => error_for(&code, host, request.timeout_ms),
                    None => ToolError::failed(format!(
                        "reading the response from `{host}` failed: {}",
                        err.to_debug_string()
                    )),
                });
            }
        }
    }
    drop(stream);
    drop(body);
    drop(response);

    let max = usize::try_from(request.max_bytes).unwrap_or(usize::MAX);
    let truncated = bytes.len() > max;
    bytes.truncate(max);
    Ok(Output {
        status,
        headers,
        body: body_text(bytes, truncated),
        truncated,
    })
}

fn timed_out(host: &str, timeout_ms: u64, doing: &str) -> ToolError {
    ToolError::failed(format!(
        "the request to `{host}` timed out after {timeout_ms} ms while {doing}; raise \
         timeout_ms (at most 60000) or try again"
    ))
}

/// The tool error for a wasi:http error code.
pub(crate) fn error_for(code: &ErrorCode, host: &str, timeout_ms: u64) -> ToolError {
    match code {
        ErrorCode::HttpRequestDenied | ErrorCode::DestinationIpProhibited => {
            ToolError::denied(format!(
                "the request to `{host}` was refused by the session's network policy: the host \
                 is not on its allowlist (network.allow), or it resolves to a private, loopback \
                 or link-local address the policy does not grant"
            ))
        }
        ErrorCode::DnsTimeout => ToolError::failed(format!(
            "looking up `{host}` timed out; check the host name or try again"
        )),
        ErrorCode::DnsError(payload) => ToolError::failed(format!(
            "`{host}` could not be resolved{}; check the host name",
            payload
                .rcode
                .as_deref()
                .map(|rcode| format!(" ({rcode})"))
                .unwrap_or_default()
        )),
        ErrorCode::DestinationNotFound => ToolError::failed(format!(
            "`{host}` could not be resolved; check the host name"
        )),
        ErrorCode::DestinationUnavailable | ErrorCode::DestinationIpUnroutable => {
            ToolError::failed(format!("`{host}` is unreachable"))
        }
        ErrorCode::ConnectionRefused => ToolError::failed(format!(
            "`{host}` refused the connection (nothing listening?)"
        )),
        ErrorCode::ConnectionTimeout => timed_out(host, timeout_ms, "connecting"),
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            timed_out(host, timeout_ms, "waiting for the response")
        }
        ErrorCode::ConnectionWriteTimeout => timed_out(host, timeout_ms, "sending the request"),
        ErrorCode::ConnectionTerminated => ToolError::failed(format!(
            "`{host}` closed the connection before the response was complete"
        )),
        ErrorCode::TlsProtocolError
        | ErrorCode::TlsCertificateError
        | ErrorCode::TlsAlertReceived(_) => ToolError::failed(format!(
            "the TLS handshake with `{host}` failed ({code:?}); the server's certificate may \
             be invalid or untrusted"
        )),
        ErrorCode::InternalError(Some(message)) => {
            ToolError::failed(format!("the request to `{host}` failed: {message}"))
        }
        other => ToolError::failed(format!("the request to `{host}` failed: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harness_tool_sdk::ErrorKind;
    use wasip2::http::types::DnsErrorPayload;

    #[test]
    fn refusals_are_denied_and_name_the_host() {
        for code in [
            ErrorCode::HttpRequestDenied,
            ErrorCode::DestinationIpProhibited,
        ] {
            let err = error_for(&code, "evil.example", 1000);
            assert_eq!(err.kind, ErrorKind::Denied);
            assert!(err.message.contains("`evil.example`"), "{}", err.message);
            assert!(err.message.contains("network.allow"), "{}", err.message);
        }
    }

    #[test]
    fn other_failures_are_failed_with_clear_messages() {
        let dns = ErrorCode::DnsError(DnsErrorPayload {
            rcode: Some("NXDOMAIN".into()),
            info_code: None,
        });
        let err = error_for(&dns, "nope.example", 1000);
        assert_eq!(err.kind, ErrorKind::Failed);
        assert!(
            err.message.contains("could not be resolved (NXDOMAIN)"),
            "{}",
            err.message
        );

        let err = error_for(&ErrorCode::ConnectionTimeout, "slow.example", 2500);
        assert_eq!(err.kind, ErrorKind::Failed);
        assert!(
            err.message.contains("timed out after 2500 ms"),
            "{}",
            err.message
        );

        let err = error_for(&ErrorCode::ConnectionRefused, "h", 1);
        assert!(
            err.message.contains("refused the connection"),
            "{}",
            err.message
        );

        let err = error_for(&ErrorCode::InternalError(Some("boom".into())), "h", 1);
        assert!(err.message.contains("boom"), "{}", err.message);

        let err = error_for(&ErrorCode::HttpProtocolError, "h", 1);
        assert_eq!(err.kind, ErrorKind::Failed);
        assert!(err.message.contains("HttpProtocolError"), "{}", err.message);
    }
}
