//! Provider settings from the control plane's configuration file (the
//! `[providers]` table): endpoints, timeouts, retries, circuit breakers.

use std::time::Duration;

use serde::Deserialize;

use super::circuit::BreakerSettings;
use super::http::HttpSettings;
use super::retry::RetryPolicy;

/// The `[providers]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// `[providers.openai]`: OpenAI and compatible servers.
    pub openai: ProviderConfig,
    /// `[providers.anthropic]`: Anthropic Messages. Base URL default:
    /// `$ANTHROPIC_BASE_URL`, else `https://api.anthropic.com`; key variable
    /// default `ANTHROPIC_API_KEY`.
    pub anthropic: ProviderConfig,
}

/// One provider's endpoint, timeouts, retries and circuit breaker. An agent
/// file may override `base-url` and `api-key-env`; each distinct endpoint has
/// its own circuit breaker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Base URL; absent: the provider's environment variable, else its public API.
    pub base_url: Option<String>,
    /// Environment variable holding the API key; absent: the provider's usual
    /// one. No key set means no credential is sent (fine for local servers).
    pub api_key_env: Option<String>,
    /// Attempts per model call, including the first. Default: 4.
    pub max_attempts: u32,
    /// Backoff before the first retry (doubling, with full jitter). Default: "500ms".
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest backoff. Default: "20s".
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; longer fails the call. Default: "60s".
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Connect timeout. Default: "10s".
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the response headers. Default: "120s".
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest silence inside a stream. Default: "120s".
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Consecutive failed attempts that open the circuit breaker. Default: 5.
    pub circuit_breaker_threshold: u32,
    /// How long an open breaker refuses requests. Default: "30s".
    #[serde(with = "humantime_serde")]
    pub circuit_breaker_cooldown: Duration,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        let http = HttpSettings::default();
        Self {
            base_url: None,
            api_key_env: None,
            max_attempts: http.retry.max_attempts,
            initial_backoff: http.retry.initial_backoff,
            max_backoff: http.retry.max_backoff,
            max_retry_after: http.retry.max_retry_after,
            connect_timeout: http.connect_timeout,
            response_timeout: http.response_timeout,
            idle_timeout: http.idle_timeout,
            circuit_breaker_threshold: http.breaker.failure_threshold,
            circuit_breaker_cooldown: http.breaker.cooldown,
        }
    }
}

impl ProviderConfig {
    /// The HTTP client settings.
    pub fn http_settings(&self) -> HttpSettings {
        HttpSettings {
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            idle_timeout: self.idle_timeout,
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                initial_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                max_retry_after: self.max_retry_after,
            },
            breaker: BreakerSettings {
                failure_threshold: self.circuit_breaker_threshold,
                cooldown: self.circuit_breaker_cooldown,
            },
        }
    }
}
