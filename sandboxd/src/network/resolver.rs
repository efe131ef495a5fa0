//! Name resolution done by sandboxd itself, so that the address a request
//! goes to is the address that was checked (no second lookup for an
//! attacker-controlled DNS answer to change).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Resolves host names for egress.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    static_hosts: Arc<BTreeMap<String, Vec<IpAddr>>>,
}

impl Resolver {
    /// A resolver that answers `static_hosts` itself (names are matched after
    /// normalisation) and asks the system resolver for everything else.
    pub fn new(static_hosts: BTreeMap<String, Vec<IpAddr>>) -> Self {
        let normalized = static_hosts
            .into_iter()
            .map(|(host, ips)| (super::allowlist::normalize_host(&host), ips))
            .collect();
        Self {
            static_hosts: Arc::new(normalized),
        }
    }

    /// All addresses of `host:port`; an IP literal resolves to itself.
    pub async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let host = super::allowlist::normalize_host(host);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        if let Some(ips) = self.static_hosts.get(&host) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        Ok(tokio::net::lookup_host((host.as_str(), port))
            .await?
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn static_hosts_and_literals_resolve_without_dns() {
        let resolver = Resolver::new(
            [(
                "API.Allowed.Test".to_owned(),
                vec!["127.0.0.1".parse().unwrap()],
            )]
            .into(),
        );
        assert_eq!(
            resolver.resolve("api.allowed.test.", 8080).await.unwrap(),
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        assert_eq!(
            resolver.resolve("[::1]", 80).await.unwrap(),
            vec!["[::1]:80".parse().unwrap()]
        );
    }
}
