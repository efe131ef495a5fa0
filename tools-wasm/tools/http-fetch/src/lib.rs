//! Standard tool `http_fetch`: one HTTP GET or POST through `wasi:http/outgoing-handler`.
//!
//! The request goes to sandboxd, not to the network: the host decides whether the session's
//! network allowlist grants the destination (resolving the name itself and refusing private
//! and loopback addresses unless a CIDR is granted) and answers a refusal with the wasi:http
//! error `HTTP-request-denied`, which this tool reports as `denied`.

use std::collections::BTreeMap;

use harness_tool_sdk::{Tool, ToolError, export_tool};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod fetch;
mod url;

/// Default and largest `max_bytes`.
const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
const LIMIT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default and largest `timeout_ms`.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const LIMIT_TIMEOUT_MS: u64 = 60_000;
/// Sent unless the caller gives its own; some APIs refuse requests without one.
const USER_AGENT: &str = concat!("harness-http-fetch/", env!("CARGO_PKG_VERSION"));

/// The request to make.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Absolute http or https URL, e.g. `https://api.example.com/v1/items?page=2`. The host
    /// must be allowed by the session's network policy.
    pub url: String,
    /// HTTP method. Defaults to `GET`.
    #[serde(default)]
    pub method: Method,
    /// Request headers, name to value, e.g. `{"accept": "application/json"}`. Hop-by-hop
    /// headers (`host`, `connection`, `transfer-encoding`, ...) are set by the runtime and
    /// refused here.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body, sent as given (UTF-8). Only allowed with `POST`; set a `content-type`
    /// header to match.
    pub body: Option<String>,
    /// Most bytes of the response body to return; a longer body is cut and `truncated` is
    /// set. Defaults to 1048576 (1 MiB), at most 10485760 (10 MiB).
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1, max = 10485760))]
    pub max_bytes: u64,
    /// Time limit for the whole request in milliseconds, from connecting to the last byte
    /// of the body. Defaults to 10000, at most 60000.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: u64,
}

fn default_max_bytes() -> u64 {
    DEFAULT_MAX_BYTES
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// HTTP method.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// Fetch a resource.
    #[default]
    Get,
    /// Send `body` to the resource.
    Post,
}

/// The response.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// HTTP status code, e.g. 200 or 404. A non-2xx status is still a successful fetch.
    pub status: u16,
    /// Response headers, names in lowercase; a header sent several times has its values
    /// joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The response body as text (invalid UTF-8 replaced with U+FFFD), at most `max_bytes`
    /// bytes of it.
    pub body: String,
    /// True when the body was longer than `max_bytes` and has been cut.
    pub truncated: bool,
}

/// The `http_fetch` tool.
pub struct HttpFetch;

impl Tool for HttpFetch {
    const NAME: &str = "http_fetch";
    const DESCRIPTION: &str = "Fetches a URL over HTTP or HTTPS (GET, or POST with a body) and \
        returns the status, headers and body text. Only hosts allowed by the session's network \
        policy can be reached; others fail with `denied`. The body is cut at `max_bytes`.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        let request = Request::new(input)?;
        fetch::fetch(&request)
    }
}

/// A checked request, ready to send.
#[derive(Debug)]
struct Request {
    target: url::Target,
    method: Method,
    /// Header names in lowercase, values as given, `user-agent` and `content-length` added
    /// where missing.
    headers: Vec<(String, String)>,
    body: Option<String>,
    max_bytes: u64,
    timeout_ms: u64,
}

impl Request {
    /// Checks everything about `input` that can be checked without the network.
    fn new(input: Input) -> Result<Self, ToolError> {
        let target = url::Target::parse(&input.url)?;
        if input.max_bytes == 0 || input.max_bytes > LIMIT_MAX_BYTES {
            return Err(ToolError::invalid_input(format!(
                "max_bytes must be between 1 and {LIMIT_MAX_BYTES} (10 MiB)"
            )));
        }
        if input.timeout_ms == 0 || input.timeout_ms > LIMIT_TIMEOUT_MS {
            return Err(ToolError::invalid_input(format!(
                "timeout_ms must be between 1 and {LIMIT_TIMEOUT_MS}"
            )));
        }
        if input.body.is_some() && input.method == Method::Get {
            return Err(ToolError::invalid_input(
                "a GET request cannot have a body; use method POST",
            ));
        }
        let mut headers = Vec::with_capacity(input.headers.len() + 2);
        for (name, value) in input.headers {
            check_header(&name, &value)?;
            let name = name.to_ascii_lowercase();
            if headers.iter().any(|(seen, _)| *seen == name) {
                return Err(ToolError::invalid_input(format!(
                    "header `{name}` is given twice (header names are case-insensitive)"
                )));
            }
            headers.push((name, value));
        }
        if !headers.iter().any(|(name, _)| name == "user-agent") {
            headers.push(("user-agent".to_owned(), USER_AGENT.to_owned()));
        }
        if let Some(body) = &input.body {
            // Without a length the body would go out chunked, which some servers refuse.
            if let Some((_, given)) = headers.iter().find(|(name, _)| name == "content-length") {
                if given.trim() != body.len().to_string() {
                    return Err(ToolError::invalid_input(format!(
                        "the content-length header says {given} but the body is {} bytes; \
                         leave content-length out and it is set for you",
                        body.len()
                    )));
                }
            } else {
                headers.push(("content-length".to_owned(), body.len().to_string()));
            }
        }
        Ok(Self {
            target,
            method: input.method,
            headers,
            body: input.body,
            max_bytes: input.max_bytes,
            timeout_ms: input.timeout_ms,
        })
    }
}

/// Refuses header names and values that are not valid HTTP, with a message naming the
/// header, before the runtime refuses them with a bare "invalid syntax".
fn check_header(name: &str, value: &str) -> Result<(), ToolError> {
    // RFC 9110 `token`.
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(ToolError::invalid_input(format!(
            "`{}` is not a valid header name",
            name.escape_default()
        )));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(ToolError::invalid_input(format!(
            "the value of header `{name}` contains a line break or NUL"
        )));
    }
    Ok(())
}

/// The body text of a response cut to `max_bytes`: invalid UTF-8 is replaced, and a
/// character split by the cut is dropped rather than shown as a replacement character.
fn body_text(mut bytes: Vec<u8>, truncated: bool) -> String {
    if truncated && let Err(err) = std::str::from_utf8(&bytes) {
        // `error_len() == None` means the bytes end inside a character: the cut's doing.
        if err.error_len().is_none() {
            bytes.truncate(err.valid_up_to());
        }
    }
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

export_tool!(HttpFetch);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    fn input(json: serde_json::Value) -> Input {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_and_added_headers() {
        let req = Request::new(input(serde_json::json!({"url": "https://example.com"}))).unwrap();
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.max_bytes, 1024 * 1024);
        assert_eq!(req.timeout_ms, 10_000);
        assert_eq!(req.target.path_with_query, "/");
        assert_eq!(
            req.headers,
            [("user-agent".to_owned(), USER_AGENT.to_owned())]
        );

        let req = Request::new(input(serde_json::json!({
            "url": "http://example.com/x",
            "method": "POST",
            "headers": {"Content-Type": "application/json", "User-Agent": "me"},
            "body": "{\"a\":1}",
        })))
        .unwrap();
        assert_eq!(req.method, Method::Post);
        assert_eq!(
            req.headers,
            [
                ("content-type".to_owned(), "application/json".to_owned()),
                ("user-agent".to_owned(), "me".to_owned()),
                ("content-length".to_owned(), "7".to_owned()),
            ]
        );
    }

    #[test]
    fn refuses_bad_requests_before_sending() {
        for json in [
            serde_json::json!({"url": "ftp://example.com"}),
            serde_json::json!({"url": "example.com"}),
            serde_json::json!({"url": "https://example.com", "body": "x"}),
            serde_json::json!({"url": "https://example.com", "max_bytes": 0}),
            serde_json::json!({"url": "https://example.com", "max_bytes": 10485761}),
            serde_json::json!({"url": "https://example.com", "timeout_ms": 60001}),
            serde_json::json!({"url": "https://example.com", "headers": {"bad name": "x"}}),
            serde_json::json!({"url": "https://example.com", "headers": {"x": "a\r\nb: c"}}),
            serde_json::json!({"url": "https://example.com", "headers": {"A": "1", "a": "2"}}),
            serde_json::json!({"url": "https://example.com", "method": "POST", "body": "abc",
                               "headers": {"content-length": "5"}}),
        ] {
            let err = Request::new(input(json.clone())).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidInput, "{json}: {}", err.message);
        }
        // Unknown methods and fields never reach `run`.
        assert!(
            harness_tool_sdk::invoke::<HttpFetch>(r#"{"url": "https://x", "method": "PUT"}"#)
                .is_err()
        );
        assert!(
            harness_tool_sdk::invoke::<HttpFetch>(r#"{"url": "https://x", "verb": "GET"}"#)
                .is_err()
        );
    }

    #[test]
    fn body_text_drops_a_split_character_only_when_cut() {
        let bytes = "añ".as_bytes()[..2].to_vec();
        assert_eq!(body_text(bytes.clone(), true), "a");
        assert_eq!(body_text(bytes, false), "a\u{fffd}");
        assert_eq!(body_text(vec![b'a', 0xff, b'b'], true), "a\u{fffd}b");
        assert_eq!(body_text(b"plain".to_vec(), false), "plain");
    }

    #[test]
    fn schema_has_bounds_and_methods() {
        let json: serde_json::Value =
            serde_json::from_str(&harness_tool_sdk::describe::<HttpFetch>()).unwrap();
        let props = &json["input_schema"]["properties"];
        assert_eq!(props["max_bytes"]["maximum"], 10485760);
        assert_eq!(props["timeout_ms"]["maximum"], 60000);
        assert_eq!(props["method"]["default"], "GET");
        assert_eq!(json["input_schema"]["required"], serde_json::json!(["url"]));
    }
}
