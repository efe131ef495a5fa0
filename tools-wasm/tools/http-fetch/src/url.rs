//! Just enough URL parsing to fill in a wasi:http request: scheme, authority, and path with
//! query. A full URL crate would triple the component's size for Unicode host names, which
//! the allowlist matches in their ASCII form anyway.

use std::fmt::Write as _;
use std::net::Ipv6Addr;

use harness_tool_sdk::ToolError;

/// The scheme of an accepted URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) scheme: Scheme,
    /// Host name in lowercase, or an IP address (IPv6 in brackets); no port.
    pub(crate) host: String,
    /// `host` or `host:port`, as sent in the request (and its `host` header).
    pub(crate) authority: String,
    /// Path and query, starting with `/`, with anything not allowed in a request line
    /// percent-encoded; never the fragment.
    pub(crate) path_with_query: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, ToolError> {
        let url = url.trim();
        let invalid = |why: &str| ToolError::invalid_input(format!("invalid URL `{url}`: {why}"));
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid(
                "it has no scheme; give an absolute URL starting with http:// or https://",
            ));
        };
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return Err(invalid("only http and https URLs can be fetched")),
        };
        // The fragment is for the client only; it is never sent.
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(invalid(
                "credentials in URLs are not supported; send an `authorization` header instead",
            ));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| {
            invalid(
                "the host is missing or malformed (expected `host`, `host:port` or `[ipv6]:port`)",
            )
        })?;
        if !host.starts_with('[')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(invalid(
                "the host name has characters a host name cannot have (give an internationalised \
                 name in its xn-- form)",
            ));
        }
        let host = host.to_ascii_lowercase();
        let authority = match port {
            Some(port) => format!("{host}:{port}"),
            None => host.clone(),
        };
        let path_with_query = encode_path(path);
        Ok(Self {
            scheme,
            host,
            authority,
            path_with_query,
        })
    }
}

/// Splits `host[:port]` or `[ipv6][:port]`; `None` if the host is empty or the port is not
/// a number from 1 to 65535.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let close = inner.find(']')?;
        inner[..close].parse::<Ipv6Addr>().ok()?;
        let (host, after) = authority.split_at(close + 2);
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => None,
        Some(port) => match port.parse::<u16>().ok()? {
            0 => return None,
            port => Some(port),
        },
    };
    Some((host, port))
}

/// `path` (which may be empty or start with `?`) as a request target: starting with `/`,
/// spaces, controls, non-ASCII and the characters RFC 3986 never allows percent-encoded,
/// existing `%xx` escapes kept.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    for byte in path.bytes() {
        let keep = byte.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&byte);
        if keep {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(url: &str) -> (Scheme, String, String, String) {
        let t = Target::parse(url).unwrap();
        (t.scheme, t.host, t.authority, t.path_with_query)
    }

    #[test]
    fn parses_the_parts_a_request_needs() {
        assert_eq!(
            parse("https://Example.COM"),
            (
                Scheme::Https,
                "example.com".into(),
                "example.com".into(),
                "/".into()
            )
        );
        assert_eq!(
            parse("HTTP://api.example.com:8080/v1/items?page=2&q=a%20b#frag"),
            (
                Scheme::Http,
                "api.example.com".into(),
                "api.example.com:8080".into(),
                "/v1/items?page=2&q=a%20b".into()
            )
        );
        assert_eq!(parse("http://h?x=1").3, "/?x=1");
        assert_eq!(
            parse("http://[::1]:3000/a"),
            (
                Scheme::Http,
                "[::1]".into(),
                "[::1]:3000".into(),
                "/a".into()
            )
        );
        assert_eq!(parse("http://[::1]").2, "[::1]");
        assert_eq!(parse("http://127.0.0.1/").1, "127.0.0.1");
        assert_eq!(parse("  https://h/p  ").3, "/p");
    }

    #[test]
    fn encodes_what_a_request_line_cannot_carry() {
        assert_eq!(parse("http://h/a b").3, "/a%20b");
        assert_eq!(
            parse("http://h/caf\u{e9}?q=\"x\"").3,
            "/caf%C3%A9?q=%22x%22"
        );
        assert_eq!(parse("http://h/a%2Fb").3, "/a%2Fb");
    }

    #[test]
    fn refuses_what_it_cannot_send() {
        for url in [
            "example.com/x",
            "ftp://example.com/",
            "file:///etc/passwd",
            "http://",
            "http:///path",
            "http://user:pw@example.com/",
            "http://example.com:0/",
            "http://example.com:99999/",
            "http://example.com:/",
            "http://exa mple.com/",
            "http://b\u{fc}cher.de/",
            "http://[::1/",
            "http://[nope]/",
            "http://[::1]x/",
            "http://a:1:2/",
        ] {
            let err = Target::parse(url).unwrap_err();
            assert_eq!(err.kind, harness_tool_sdk::ErrorKind::InvalidInput, "{url}");
            assert!(
                err.message.contains("invalid URL"),
                "{url}: {}",
                err.message
            );
        }
    }
}
