//! The one way any backend opens an outgoing connection for a sandbox: check
//! the destination against the session's allowlist, resolve the name with
//! sandboxd's own resolver, refuse special-range answers no granted CIDR
//! covers, connect only to an address that was checked, and record the
//! decision. The `wasi:http` hook ([`super::http_egress`]) and the process
//! backend's proxy ([`crate::network::proxy`]) both go through
//! [`EgressPolicy::connect`], so the two cannot drift apart.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;

use super::allowlist::{Allowlist, Verdict, normalize_host};
use super::resolver::Resolver;

/// What a session may reach, shared by its invocations.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// The session's rules.
    pub allowlist: Arc<Allowlist>,
    /// Name resolution.
    pub resolver: Resolver,
    /// Where decisions are recorded.
    pub log: Arc<EgressLog>,
}

/// One recorded egress decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRecord {
    /// When.
    pub at: SystemTime,
    /// `host:port` as requested.
    pub destination: String,
    /// For an allowed record, the address connected to; for a refusal
    /// because of what the name resolved to, the offending address;
    /// otherwise `None`.
    pub address: Option<SocketAddr>,
    /// True only when a connection to `address` was made.
    pub allowed: bool,
    /// The matching rule, or the reason for the refusal or failure.
    pub detail: String,
}

/// A bounded log of a session's allowed and refused connections.
#[derive(Debug, Default)]
pub struct EgressLog {
    records: Mutex<VecDeque<EgressRecord>>,
}

/// How many decisions a session keeps.
const EGRESS_LOG_LIMIT: usize = 1000;

impl EgressLog {
    /// Records a decision, dropping the oldest beyond the limit.
    pub fn record(&self, record: EgressRecord) {
        if record.allowed {
            tracing::info!(destination = %record.destination, address = ?record.address, rule = %record.detail, "egress allowed");
        } else {
            tracing::warn!(destination = %record.destination, address = ?record.address, reason = %record.detail, "egress refused");
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.push_back(record);
        while records.len() > EGRESS_LOG_LIMIT {
            records.pop_front();
        }
    }

    /// The recorded decisions, oldest first.
    pub fn records(&self) -> Vec<EgressRecord> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Why no connection was made. Every variant has already been recorded in
/// the session's [`EgressLog`] when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The policy refuses the destination (by name, or by what it resolved
    /// to). The message is the one-line reason.
    #[error("{reason}")]
    Refused {
        /// `host:port` as requested.
        destination: String,
        /// Why, naming the rule decision.
        reason: String,
    },
    /// The name could not be resolved.
    #[error("{host} did not resolve")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to no address at all.
    #[error("{host} resolved to no addresses")]
    NoAddresses {
        /// The host name.
        host: String,
    },
    /// Every checked address refused or failed the connection; this is the
    /// last failure.
    #[error("cannot connect to {destination} at {address}")]
    Connect {
        /// `host:port` as requested.
        destination: String,
        /// The last address tried.
        address: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the last address tried took longer than allowed.
    #[error("connecting to {destination} at {address} timed out after {timeout:?}")]
    ConnectTimeout {
        /// `host:port` as requested.
        destination: String,
        /// The last address tried.
        address: SocketAddr,
        /// The limit per address.
        timeout: Duration,
    },
}

/// A connection made under the policy.
#[derive(Debug)]
pub struct EgressConnection {
    /// The connected socket (`TCP_NODELAY` set).
    pub stream: TcpStream,
    /// The address it is connected to, which passed every check.
    pub address: SocketAddr,
    /// The allow rule that admitted the destination.
    pub rule: String,
}

impl EgressPolicy {
    /// Opens a TCP connection to `host:port` if the policy allows it, and
    /// records the decision (exactly one [`EgressRecord`] per call).
    ///
    /// Every resolved address must pass the special-range check: an allowed
    /// name that also resolves to a metadata or loopback address is refused
    /// outright rather than trimmed, since such an answer is a sign of DNS
    /// rebinding. `timeout` bounds the name resolution and each connection
    /// attempt.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<EgressConnection, EgressError> {
        let host = normalize_host(host);
        let destination = format!("{host}:{port}");
        let rule = match self.allowlist.check_destination(&host, port) {
            Verdict::Allow(rule) => rule,
            Verdict::Deny(reason) => {
                self.refuse(&destination, None, &reason);
                return Err(EgressError::Refused {
                    destination,
                    reason,
                });
            }
        };
        let resolved = tokio::time::timeout(timeout, self.resolver.resolve(&host, port))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("name resolution took longer than {timeout:?}"),
                ))
            });
        let addresses = match resolved {
            Ok(addresses) if !addresses.is_empty() => addresses,
            Ok(_) => {
                self.refuse(
                    &destination,
                    None,
                    &format!("{host} resolved to no addresses"),
                );
                return Err(EgressError::NoAddresses { host });
            }
            Err(source) => {
                self.refuse(
                    &destination,
                    None,
                    &format!("{host} did not resolve: {source}"),
                );
                return Err(EgressError::Resolve { host, source });
            }
        };
        for address in &addresses {
            if let Some(range) = self.allowlist.uncovered_special_range(address.ip()) {
                let reason = format!(
                    "{host} resolves to {}, a {range} address, and no granted CIDR covers it",
                    address.ip()
                );
                self.refuse(&destination, Some(*address), &reason);
                return Err(EgressError::Refused {
                    destination,
                    reason,
                });
            }
        }
        match connect_any(&destination, &addresses, timeout).await {
            Ok((stream, address)) => {
                self.log.record(EgressRecord {
                    at: SystemTime::now(),
                    destination,
                    address: Some(address),
                    allowed: true,
                    detail: rule.clone(),
                });
                Ok(EgressConnection {
                    stream,
                    address,
                    rule,
                })
            }
            Err(error) => {
                let detail = format!("allowed by rule {rule:?}, but {error}");
                let detail = match std::error::Error::source(&error) {
                    Some(source) => format!("{detail}: {source}"),
                    None => detail,
                };
                self.refuse(&destination, None, &detail);
                Err(error)
            }
        }
    }

    fn refuse(&self, destination: &str, address: Option<SocketAddr>, detail: &str) {
        self.log.record(EgressRecord {
            at: SystemTime::now(),
            destination: destination.to_owned(),
            address,
            allowed: false,
            detail: detail.to_owned(),
        });
    }
}

/// Tries each checked address in turn; `addresses` is never empty.
async fn connect_any(
    destination: &str,
    addresses: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), EgressError> {
    let mut last = None;
    for &address in addresses {
        match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                // Latency matters more than packet count for proxied traffic;
                // failing to set it is harmless.
                let _ = stream.set_nodelay(true);
                return Ok((stream, address));
            }
            Ok(Err(source)) => {
                last = Some(EgressError::Connect {
                    destination: destination.to_owned(),
                    address,
                    source,
                });
            }
            Err(_) => {
                last = Some(EgressError::ConnectTimeout {
                    destination: destination.to_owned(),
                    address,
                    timeout,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| EgressError::NoAddresses {
        host: destination.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use harness_proto::sandbox::v1 as pb;

    use super::*;

    fn policy(allow: &[&str], cidrs: &[&str], hosts: &[(&str, &str)]) -> EgressPolicy {
        let allowlist = Allowlist::from_policy(&pb::NetworkPolicy {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: vec![],
            allow_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
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

    /// The records without their timestamps, for whole-value asserts.
    fn decisions(policy: &EgressPolicy) -> Vec<(String, Option<SocketAddr>, bool, String)> {
        policy
            .log
            .records()
            .into_iter()
            .map(|r| (r.destination, r.address, r.allowed, r.detail))
            .collect()
    }

    #[tokio::test]
    async fn connects_only_to_checked_addresses_and_logs_each_decision() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let granted = policy(
            &["*.allowed.test"],
            &["127.0.0.0/8"],
            &[("api.allowed.test", "127.0.0.1")],
        );
        let connection = granted
            .connect("API.allowed.test.", port, Duration::from_secs(5))
            .await
            .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(connection.address, address);
        assert_eq!(connection.rule, "*.allowed.test");
        let refused = granted
            .connect("allowed.test", port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!("host allowed.test port {port} is not on the allowlist")
        );
        assert_eq!(
            decisions(&granted),
            vec![
                (
                    format!("api.allowed.test:{port}"),
                    Some(address),
                    true,
                    "*.allowed.test".to_owned()
                ),
                (
                    format!("allowed.test:{port}"),
                    None,
                    false,
                    format!("host allowed.test port {port} is not on the allowlist")
                ),
            ]
        );
    }

    #[tokio::test]
    async fn special_range_answers_are_refused_before_connecting() {
        let closed = policy(
            &["*.allowed.test"],
            &[],
            &[("meta.allowed.test", "169.254.169.254")],
        );
        let error = closed
            .connect("meta.allowed.test", 80, Duration::from_secs(5))
            .await
            .unwrap_err();
        let reason = "meta.allowed.test resolves to 169.254.169.254, a link-local / cloud \
                      metadata (169.254.0.0/16) address, and no granted CIDR covers it";
        assert_eq!(error.to_string(), reason);
        assert_eq!(
            decisions(&closed),
            vec![(
                "meta.allowed.test:80".to_owned(),
                Some("169.254.169.254:80".parse().unwrap()),
                false,
                reason.to_owned()
            )]
        );
    }

    #[tokio::test]
    async fn failed_connections_are_recorded_as_not_allowed() {
        // Bind and drop to find a loopback port nobody listens on.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let granted = policy(
            &["*.allowed.test"],
            &["127.0.0.0/8"],
            &[("api.allowed.test", "127.0.0.1")],
        );
        let error = granted
            .connect("api.allowed.test", port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, EgressError::Connect { .. }), "{error:?}");
        let records = granted.log.records();
        assert_eq!(records.len(), 1);
        assert!(!records[0].allowed);
        assert!(
            records[0]
                .detail
                .starts_with("allowed by rule \"*.allowed.test\", but cannot connect"),
            "{}",
            records[0].detail
        );
    }
}
